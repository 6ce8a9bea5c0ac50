"""DINO — Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. "Emerging Properties in Self-Supervised
Vision Transformers". ICCV 2021, arXiv:2104.14294. Catalog id: ``dino``.
Official code: https://github.com/facebookresearch/dino (``main_dino.py``, ``DINOHead``).

Self-distillation with no labels. A student g_s (backbone + head) and a teacher g_t of the same architecture
map a view x to K scores; temperature softmaxes turn them into distributions (Eq. 1)

    P_s(x) = softmax(g_s(x) / tau_s),        P_t(x) = softmax((g_t(x) - c) / tau_t),

where the teacher's scores are centred by c and sharpened by tau_t < tau_s. Multi-crop: two global crops
x_1^g, x_2^g and M local crops of lower resolution form the view set V; the teacher sees only the global
crops, the student every crop, and the student matches the teacher across all pairs of different views
(Eq. 2-3, Algorithm 1):

    L = 1 / (2 (|V| - 1))  sum_{x in {x_1^g, x_2^g}}  sum_{x' in V, x' != x}  H(P_t(x), P_s(x')),
    H(a, b) = - sum_k a_k log b_k.

The teacher gets no gradient. After every step (Algorithm 1): theta_t <- lambda theta_t + (1 - lambda)
theta_s with lambda on a cosine schedule from 0.996 to 1 (Sec. 3.1; parameters only: the teacher's BN
statistics come from its own forward passes, as in the official code), and the centre follows the teacher's
batch mean, c <- m c + (1 - m) (1/B) sum_i g_t(x_i) (Eq. 4). tau_t warms up linearly from 0.04 to 0.07;
tau_s = 0.1 (Sec. 3.2, "Implementation details"). The head (Sec. 3.1; official ``DINOHead``) is a 3-layer
MLP (hidden 2048, GELU) to a 256-d bottleneck, L2 normalisation, and a weight-normalised linear layer to
K = 65536 scores without bias, whose row norms are fixed to 1 (``norm_last_layer``) and whose weights are
not updated during the first epoch (``freeze_last_layer``).

Collapse: no negatives. Centering keeps one score from dominating but pushes P_t towards uniform;
sharpening (tau_t small) pushes the other way; together, with the slowly moving teacher, they keep the
output from collapsing to either (Sec. 3.1, Sec. 5.3 and Fig. 7: teacher entropy and KL). The logged
``teacher_entropy`` shows it: log K for a uniform collapse, 0 for a one-hot one.

Distributed: the cross-entropy is per sample, so DDP's gradient averaging gives the global batch's loss.
The centre update uses the global batch mean of the teacher's scores: their sum is all-reduced over ranks
and divided by the global count, as the official code does, so the centre (a buffer) stays identical on
every rank. BN statistics (backbone, and the head with ``use_bn_in_head``) are global with SyncBatchNorm,
as in the official code; without it (CPU) each rank keeps its own, the teacher's included.

Deviations: the harness has no weight-decay schedule, so the decay stays at its initial 0.04 instead of
the cosine ramp to 0.4 (Sec. 3.2); the learning rate decays to 0, not to 1e-6; no gradient clipping
(official ``--clip_grad 3.0``) and no stochastic depth in the ViT (``--drop_path_rate 0.1``): the harness
has neither. Crops are resized bilinearly, not bicubically, so that they run batched on the device; the
blur is dropped below 64 px (as SimCLR does for CIFAR-10). Durations in epochs (teacher-temperature
warm-up, frozen last layer) are taken as fractions of ``epochs`` and applied to the run's total steps, and
the warm-up is linear per step instead of per epoch. The last layer is frozen by zeroing its gradients
(a gradient hook), not by dropping them before the optimizer step: the harness has no hook between
backward and step. With the row norms fixed, momentum and weight decay then only rescale the
weight-norm direction v, so the layer's weights stay exactly as they are; the optimizer's step count
(AdamW's bias correction) includes the frozen steps, though. A ViT sees local crops with its fixed
position embeddings resized bicubically to the crop's patch grid, as the official code interpolates its
learned ones (Sec. 3.2).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    out_dim: int = 65536
    """K, the number of scores of the head's last layer (Sec. 3.1; official ``--out_dim``)."""
    proj_hidden_dim: int = 2048
    """Hidden width of the head's 3-layer MLP (Sec. 3.1)."""
    proj_dim: int = 256
    """Bottleneck: the MLP's output, L2-normalised before the last layer (official ``DINOHead``'s
    ``bottleneck_dim``; not stated in the paper's text)."""
    use_bn_in_head: bool = False
    """BatchNorm after the MLP's two hidden layers (official ``--use_bn_in_head``, default False)."""
    norm_last_layer: bool = True
    """Fix the norms of the weight-normalised last layer's rows to 1 (official ``--norm_last_layer``,
    default True; its help text: False for ViT-S trains better but less stably)."""
    student_temp: float = 0.1
    """tau_s (Sec. 3.2; official ``DINOLoss``)."""
    teacher_temp: float = 0.07
    """tau_t after its warm-up (Sec. 3.2: 0.04 -> 0.07; official README, "Boosting DINO performance")."""
    warmup_teacher_temp: float = 0.04
    """tau_t at the start of the warm-up (Sec. 3.2; official ``--warmup_teacher_temp``)."""
    warmup_teacher_temp_epochs: float = 30
    """Length of tau_t's linear warm-up in epochs (Sec. 3.2: "the first 30 epochs")."""
    center_momentum: float = 0.9
    """m of the centre's update, Eq. 4 (official ``DINOLoss(center_momentum=0.9)``)."""
    momentum_teacher: float = 0.996
    """Base EMA rate lambda of the teacher, raised to 1 with a cosine schedule (Sec. 3.1; official
    ``--momentum_teacher``)."""
    freeze_last_layer: float = 1
    """Epochs during which the head's last layer is not updated (official ``--freeze_last_layer 1``)."""
    n_local_crops: int = 8
    """M, the number of local crops (official ``--local_crops_number 8``; the best ViT-S/16 run uses 10)."""
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    """Area range of the global crops (official ``--global_crops_scale``; Sec. 3.1: "greater than 50%")."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of the local crops (official ``--local_crops_scale``)."""
    local_crop_ratio: float = 96 / 224
    """Side of a local crop over a global one: 96 px vs. 224 px (Sec. 3.1)."""
    optimizer: str = "adamw"
    """AdamW (Sec. 3.2; official ``--optimizer adamw``, recommended for ViTs)."""
    base_lr: float = 5e-4
    """lr = 0.0005 x batch/256 after the warm-up, then cosine decay (Sec. 3.2)."""
    weight_decay: float = 0.04
    """Initial weight decay (Sec. 3.2: cosine from 0.04 to 0.4; kept fixed here, see Deviations)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's defaults (official code: ``torch.optim.AdamW(params_groups)``)."""
    warmup_epochs: int = 10
    """Linear learning-rate warm-up (Sec. 3.2)."""
    epochs: int = 100
    """Official ``--epochs 100`` (the paper's best ViT-S/16 trains 800)."""
    batch_size: int = 1024
    """Sec. 3.2 (ViT-S/16 on 16 GPUs)."""
    sync_batchnorm: bool = True
    """Official code converts BN to SyncBatchNorm in backbones that have it (ResNet-50)."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn), k-NN
# of the teacher (random init: 83.9%). Tried: the paper's head (256-d bottleneck, no BN) with K 4096, tau_t
# 0.04 -> 0.07 over 3 epochs, base_lr 4e-3: P_t near uniform (teacher entropy 8.2, log K = 8.3, by step 20);
# BN in the head alone: entropy 7.5 at step 10, back up to 8.2 by step 130 (both stopped); + K 1024, a 64-d
# bottleneck, tau_t fixed at 0.04, base_lr 8e-3: 80.0%; the same with base_lr 2e-3: 84.2% with the
# teacher's BN statistics copied from the student, 85.6% with its own (as now). Hence:
# - epochs 15: the harness's budget, so that the epoch-based durations are counted in its epochs;
# - use_bn_in_head: at initialisation the small CNN's pooled features of different digits point nearly the
#   same way, so the teacher's scores hardly differ between images and centering leaves P_t uniform; BN in
#   the head (an official option) spreads them;
# - proj_dim 64: the scores of a random unit bottleneck against the unit rows spread as 1/sqrt(proj_dim), so
#   64 dimensions give tau_t something to sharpen from the first step;
# - out_dim 1024, proj_hidden_dim 1024: K = 65536 scores per view cost about as much as the small CNN, for
#   a data set of 1,437 images;
# - teacher_temp 0.04, the official default (no warm-up): with the warm-up to 0.07 (and the paper's head)
#   P_t went uniform;
# - n_local_crops 4: each 16-px local crop costs a quarter of a global one;
# - momentum_teacher 0.99: with 0.996 the teacher moves little in 330 steps (BYOL's preset does the same);
# - base_lr 2e-3 (a peak lr of 5e-4 at batch 64) with warmup_epochs 1: 10 warm-up epochs would be two
#   thirds of the run; base_lr 8e-3 was worse (above);
# - local_crop_scale (0.14, 0.4): 5% of an 8x8 digit upscaled to 32 px is a blob.
PRESETS = {
    "small": dict(epochs=15, use_bn_in_head=True, proj_dim=64, out_dim=1024, proj_hidden_dim=1024,
                  teacher_temp=0.04, n_local_crops=4, momentum_teacher=0.99, base_lr=2e-3, warmup_epochs=1,
                  local_crop_scale=(0.14, 0.4)),
}


# --- augmentations (Sec. 3.1 multi-crop; BYOL's colour and blur, official DataAugmentationDINO) -------


def local_crop_size(cfg: Config, image_size: int) -> int:
    """The local crops' side: the 96/224 ratio rounded to a multiple of 8 (96 is one: six ViT-S/16 patches);
    16 px at 32 px, i.e. four 4-px patches, 2x2 after three poolings."""
    return max(8, 8 * round(image_size * cfg.local_crop_ratio / 8))


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """2 + M views, each its own v2 pipeline: the first global crop always blurred, the second blurred with
    p=0.1 and solarised with p=0.2 (BYOL's asymmetric pair), then M smaller local crops blurred with p=0.5.
    All share flip, colour jitter (p=0.8) and grayscale (p=0.2). Each takes a PIL image or a uint8 tensor."""

    def make(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:  # sigma 0.1-2 px (official: PIL radius), kernel 10% of the crop's side
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # on uint8 values, before ToDtype
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    local = local_crop_size(cfg, image_size)
    first = make(image_size, cfg.global_crop_scale, 1.0, 0.0)  # T: always blurred
    second = make(image_size, cfg.global_crop_scale, 0.1, 0.2)  # T': rarely blurred, sometimes solarised
    return [first, second] + [make(local, cfg.local_crop_scale, 0.5, 0.0) for _ in range(cfg.n_local_crops)]


# --- backbone on crops of several sizes, and the head ---------------------------------------------


def encode(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone features (N, D) of x (N, C, H, W). A ViT with fixed position embeddings for another grid
    (``patch_embed`` a strided conv, ``pos_embed`` (L, D) for a square grid, ``cls_token``, ``blocks``,
    ``norm``) gets them resized bicubically to x's patch grid and returns its CLS token."""
    pos = getattr(backbone, "pos_embed", None)
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    if pos is None or stride is None:
        return backbone(x)  # not a ViT
    if pos.shape[0] == (x.shape[-2] // stride[0]) * (x.shape[-1] // stride[1]):
        return backbone(x)  # x at the ViT's own size
    t = backbone.patch_embed(x)  # (N, D, h, w)
    (h, w), d, side = t.shape[-2:], t.shape[1], math.isqrt(pos.shape[0])
    grid = pos.T.reshape(1, d, side, side).float()
    pos = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
    pos = pos.reshape(d, h * w).T  # (h*w, D)
    t = t.flatten(2).transpose(1, 2) + pos.to(t.dtype)  # (N, L_x, D)
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1), t], dim=1)  # (N, 1 + L_x, D)
    for blk in backbone.blocks:
        t = blk(t)
    return backbone.norm(t)[:, 0]  # (N, D)


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> L2 normalisation -> weight-normalised linear layer to K, no bias (Sec. 3.1;
    official ``DINOHead``: truncated-normal init with std 0.02 for the MLP, the rows' norms g set to 1)."""

    def __init__(self, in_dim: int, cfg: Config):
        super().__init__()
        hidden = cfg.proj_hidden_dim
        norm = (lambda: nn.BatchNorm1d(hidden)) if cfg.use_bn_in_head else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(), nn.GELU(),
            nn.Linear(hidden, cfg.proj_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        linear = nn.Linear(cfg.proj_dim, cfg.out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(linear)  # W = g v / ||v||, per row
        norms = self.last_layer.parametrizations.weight.original0  # g, (K, 1)
        with torch.no_grad():
            norms.fill_(1.0)
        norms.requires_grad_(not cfg.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # (N, proj_dim)
        return self.last_layer(z)  # (N, K)


class MultiCropNet(nn.Module):
    """Backbone + head on a list of views: one backbone call per run of consecutive views of the same
    resolution (the globals, then the locals), one head call on all (official ``MultiCropWrapper``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(encode(self.backbone, torch.cat(list(views[start:end]))))  # (k N, D)
            start = end
        out = self.head(torch.cat(feats))  # (V N, K)
        return list(out.split([len(v) for v in views]))  # V x (N, K)


# --- loss, centre and schedules -------------------------------------------------------------------


def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3 averaged over its pairs and the batch. student_out: V x (N, K) scores of every view, the global
    views first in the teacher's order; teacher_out: G x (N, K) scores of the global views (no gradient);
    center: (K,). Pairs (teacher view i, student view v) with v != i."""
    log_p_s = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]  # V x (N, K), Eq. 1
    p_t = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out]  # G x (N, K)
    total, pairs = 0.0, 0
    for i, q in enumerate(p_t):
        for v, lp in enumerate(log_p_s):
            if v != i:  # the same view on both sides is skipped
                total = total + (-(q * lp).sum(dim=-1)).mean()  # H(P_t, P_s), Eq. 2
                pairs += 1
    return total / pairs


@torch.no_grad()
def batch_center(teacher_out: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i g_t(x_i) over the global batch (Eq. 4): teacher_out (B_local, K); the sum is all-reduced
    over ranks and divided by the global count. Returns (K,)."""
    total = teacher_out.float().sum(dim=0)  # (K,)
    count = len(teacher_out)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        count *= dist.get_world_size()
    return total / count


def teacher_temperature(step: int, total_steps: int, cfg: Config) -> float:
    """tau_t: linear from warmup_teacher_temp to teacher_temp over the warm-up, then constant (Sec. 3.2)."""
    warmup = cfg.warmup_teacher_temp_epochs / cfg.epochs * total_steps
    if step >= warmup:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup


# copied from byol.py, which the contract test keeps identical ("Sec. 3.2" there is BYOL's)
def ema_rate(step: int, total_steps: int, tau_base: float) -> float:
    """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (Sec. 3.2)."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


@torch.no_grad()
def ema_update_parameters(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- lambda theta_t + (1 - lambda) theta_s, parameters only (official code): the teacher's BN
    statistics are its own, from its forward passes on the global crops; the student's also come from the
    local crops, at another resolution."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - momentum)


# --- model ----------------------------------------------------------------------------------------


class DINO(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.student = MultiCropNet(backbone, DINOHead(feature_dim, cfg))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)  # same initial weights
        self.register_buffer("center", torch.zeros(cfg.out_dim))  # c, Eq. 4
        # the step-dependent state of the next forward, as buffers so that a resumed run continues exactly
        self.register_buffer("teacher_temp", torch.tensor(float(cfg.warmup_teacher_temp)))
        self.register_buffer("last_layer_frozen", torch.tensor(cfg.freeze_last_layer > 0))
        for p in self.student.head.last_layer.parameters():
            if p.requires_grad:  # zero gradient while frozen (see Deviations); the teacher has no hooks
                p.register_hook(lambda g: g.masked_fill(self.last_layer_frozen, 0))
        self.pending_center: torch.Tensor | None = None  # this step's batch centre, applied in on_step_end
        self.momentum = cfg.momentum_teacher

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    def forward(self, batch: dict) -> dict:
        views = batch["views"]  # 2 global (N, C, H, W), then M local (N, C, h, w)
        student_out = self.student(views)  # V x (N, K)
        with torch.no_grad():
            teacher_out = self.teacher(views[:2])  # 2 x (N, K): the teacher sees only the global crops
        loss = dino_loss(student_out, teacher_out, self.center, self.cfg.student_temp, self.teacher_temp)
        self.pending_center = batch_center(torch.cat(teacher_out))  # (K,), global mean of uncentred scores
        with torch.no_grad():
            p_t = F.softmax((teacher_out[0].float() - self.center) / self.teacher_temp, dim=-1)  # (N, K)
            entropy = -(p_t * p_t.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return {"loss": loss, "teacher_temp": self.teacher_temp, "teacher_entropy": entropy,
                "momentum": torch.tensor(self.momentum)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step (Algorithm 1): the teacher follows the student, the centre follows the
        teacher's batch mean, and the schedules move to the next step. ``step`` counts finished steps."""
        cfg = self.cfg
        self.momentum = ema_rate(step, total_steps, cfg.momentum_teacher)
        ema_update_parameters(self.teacher, self.student, self.momentum)
        if self.pending_center is not None:
            m = cfg.center_momentum
            self.center.mul_(m).add_(self.pending_center, alpha=1 - m)  # Eq. 4
            self.pending_center = None
        self.teacher_temp.fill_(teacher_temperature(step, total_steps, cfg))
        self.last_layer_frozen.fill_(step < cfg.freeze_last_layer / cfg.epochs * total_steps)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's backbone features (the CLS token of a ViT): the official evaluation uses the
        teacher, which is the better network throughout training (Sec. 5.2)."""
        return encode(self.teacher.backbone, x)


MODEL = DINO


if __name__ == "__main__":
    t, s, c = torch.randn(8, 64), torch.randn(8, 64), torch.zeros(64)
    uniform = dino_loss([torch.zeros(8, 64)] * 2, [t, t], c, 0.1, 0.04).item()  # log K = 4.16
    print("random:", dino_loss([s, s], [t, t], c, 0.1, 0.04).item(), "uniform student:", uniform)
