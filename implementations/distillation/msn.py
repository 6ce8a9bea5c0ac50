"""MSN — Assran, Caron, Misra, Bojanowski, Bordes, Vincent, Joulin, Rabbat, Ballas. "Masked Siamese Networks
for Label-Efficient Learning". ECCV 2022, arXiv:2204.07141. Catalog id: ``msn``.
Official code: https://github.com/facebookresearch/msn (``src/msn_train.py``, ``src/losses.py``,
``configs/pretrain/msn_vits16.yaml``). PMSN (catalog id ``pmsn``) is this file with ``PRESETS["pmsn"]``:
Assran, Balestriero, Duval, Bordes, Misra, Bojanowski, Vincent, Rabbat, Ballas. "The Hidden Uniform Cluster
Prior in Self-Supervised Learning". ICLR 2023, arXiv:2210.07277 (no official code found).

Each image gives a target view x+ and M anchor views (Sec. 3): one view of the same size with a random
fraction of its patches dropped (random masking) and M - 1 small crops (focal masking: a small contiguous
region of the image). The anchor encoder (ViT + projection head) sees only the visible patches; the
target encoder, an EMA of it, sees x+ unmasked. With z, z+ and the K learnable prototypes q
L2-normalised, the predictions are softmaxes of cosine similarities,

    p_{i,m} = softmax(z_{i,m} . q / tau),      p+_i = softmax(z+_i . q / tau+),      tau+ < tau,

so the target is sharper than the anchors (official: softmax(. / tau) raised to 1/T and renormalised, i.e.
tau+ = T tau). The targets are equipartitioned over the batch by 3 Sinkhorn-Knopp iterations (official
``use_sinkhorn``) and the objective (Sec. 3, official ``init_msn_loss``) is

    L = 1/(M B) sum_i sum_m H(p+_i, p_{i,m})  +  lambda KL(p_bar || pi),    p_bar = 1/(M B) sum_{i,m} p_{i,m},

with pi uniform for MSN: KL(p_bar || U) = log K - H(p_bar), the mean-entropy maximisation (ME-MAX) term
-lambda H(p_bar) plus a constant, as the official loss writes it. PMSN replaces U by the power-law prior
pi_k proportional to k^(-tau_pl) over the prototypes (k = 1..K; the prototypes are exchangeable, so the
order only says how much mass each is meant to get). The target encoder gets no gradient (nor do the
prototypes through the target); after each step theta+ <- m theta+ + (1 - m) theta, with m rising
linearly from 0.996 towards 1 over 1.25 x the run (official ``momentum_scheduler``).

Backbones: a ViT only (attributes ``forward_tokens``, ``patch_embed``, ``pos_embed``, ``cls_token``,
``blocks``, ``norm``, as selfsup's ``vit_tiny``): masking drops tokens, which a CNN has not. The masked
anchor is encoded by ``forward_tokens(x, keep)`` with only the kept patches; focal crops of another size
get the position embeddings resized bicubically (DINO's ``encode``). Features are the CLS token.

Collapse: the ME-MAX (or prior-matching) term is minimal when the anchors' average prediction is uniform
(or the prior) over the prototypes, so mapping every image to one prototype costs lambda log K; the
sharpened target keeps each sample's prediction confident, so the uniform average cannot be reached by
making every prediction uniform (which leaves the cross-entropy at log K); Sinkhorn spreads the targets
over the prototypes too. The logged ``me_max`` is KL(p_bar || pi) (0 at the prior, log K for one-hot
collapse) and ``target_max`` the mean largest target probability (1/K for uniform targets).

Distributed: the cross-entropy is per sample, so DDP's gradient averaging gives the global batch's.
p_bar is the global mean: the local means are all-reduced and averaged, with the gradient passed through
unchanged (official ``AllReduce``), which DDP's averaging turns into the gradient of the global mean.
Sinkhorn's sums over the batch are all-reduced (official ``distributed_sinkhorn``), so every rank
normalises by the global marginals. The masking permutation is drawn from the global RNG: each rank
draws its own (the harness seeds ranks apart), as each official process does.

Deviations: the harness has no weight-decay schedule (official cosine 0.04 -> 0.4), no gradient clipping
(official ``clip_grad 3.0``), and its learning rate warms up from 0 (official from 2e-4) and decays to 0
over the run (official to 1e-6 over 1.25 x the run). The official code sums the prototypes' gradients over
ranks instead of averaging them; here DDP averages them like every other parameter (with AdamW this only
changes the scale relative to eps). Crops are resized bilinearly, not bicubically, so that they run
batched on the device; the blur is dropped below 64 px (as SimCLR does for CIFAR-10). Focal crops are
rounded to a multiple of 16 px (96 px at 224, 16 px at 32) so that they hold whole patches. PMSN: the
direction KL(p_bar || pi) generalises ME-MAX = KL(p_bar || U); the paper's own text could not be read
here, and third-party code differs (lightly's ``PMSNLoss`` computes KL(pi || p_bar)); tau_pl = 0.25 is
those implementations' default, not a value checked in the paper.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    num_prototypes: int = 1024
    """K, learnable prototypes of the projection's dimension (official ``criterion.num_proto``)."""
    proj_hidden_dim: int = 2048
    """Hidden width of the 3-layer projection head (official ``meta.hidden_dim``)."""
    proj_dim: int = 256
    """Output of the projection head, the prototypes' dimension (official ``meta.output_dim``)."""
    use_bn_in_head: bool = True
    """BatchNorm after the head's two hidden layers (official ``meta.use_bn: true``)."""
    temperature: float = 0.1
    """tau of the anchor predictions (official ``criterion.temperature``)."""
    target_temperature: float = 0.025
    """tau+ of the sharpened targets: the official code sharpens softmax(. / 0.1) with T = 0.25
    (``criterion.start_sharpen = final_sharpen = 0.25``), i.e. softmax(. / 0.025)."""
    me_max_weight: float = 1.0
    """lambda of the ME-MAX / prior-matching term (official ``criterion.me_max: true``,
    ``memax_weight 1.0``)."""
    prior_exponent: float = 0.0
    """tau_pl of the prior pi_k ~ k^(-tau_pl): 0 is the uniform prior of MSN's ME-MAX; PMSN's power law
    uses 0.25 (``PRESETS["pmsn"]``; see Deviations for where that value comes from)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp iterations on the targets; 0 disables it (official ``criterion.use_sinkhorn: true``,
    ``distributed_sinkhorn(num_itr=3)``)."""
    mask_ratio: float = 0.15
    """Fraction of the masked anchor's patches dropped at random (official ``data.patch_drop`` for ViT-S/16;
    larger ViTs use larger ratios, not checked here)."""
    n_focal_views: int = 10
    """M - 1, the focal crops per image (official ``data.focal_views``)."""
    rand_crop_scale: tuple[float, float] = (0.3, 1.0)
    """Area range of the target and masked-anchor crops (official ``make_transforms(rand_crop_scale)``)."""
    focal_crop_scale: tuple[float, float] = (0.05, 0.3)
    """Area range of the focal crops (official ``make_transforms(focal_crop_scale)``)."""
    focal_crop_ratio: float = 96 / 224
    """Side of a focal crop over the image's: 96 px at 224 (official ``data.focal_size``, ``rand_size``)."""
    color_jitter_strength: float = 0.5
    """s of the colour distortion ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) (official
    ``data.color_jitter_strength``)."""
    ema_start: float = 0.996
    """EMA rate m of the target encoder at the start (official ``_start_m``)."""
    ema_end: float = 1.0
    """EMA rate m that the linear schedule heads for (official ``_final_m``)."""
    ema_stretch: float = 1.25
    """The schedule reaches ema_end after ema_stretch x the run (official: ``ipe * num_epochs * 1.25``)."""
    optimizer: str = "adamw"
    """AdamW (official ``init_opt``)."""
    base_lr: float = 2.5e-4
    """Per 256 images: the official peak lr 0.001 (``optimization.lr``) at batch 1024."""
    weight_decay: float = 0.04
    """Initial weight decay (official ``optimization.weight_decay``; cosine to 0.4, kept fixed here);
    none on biases, norms and the prototypes (official ``WD_exclude``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's defaults (official ``torch.optim.AdamW(param_groups)``)."""
    warmup_epochs: int = 15
    """Linear learning-rate warm-up (official ``optimization.warmup``)."""
    epochs: int = 800
    """ViT-S/16 (official ``optimization.epochs``; README: ViT-S/16 checkpoint of 800 epochs)."""
    batch_size: int = 1024
    """64 per GPU (official ``criterion.batch_size``) on the README's 16 GPUs (2 nodes x 8); not stated in
    the paper's text here."""
    sync_batchnorm: bool = True
    """Official code converts both encoders' BN (the head's) to SyncBatchNorm."""


# CPU runs on the embedded digits with --backbone vit_tiny (1,437 images of 32 px, batch 64, 15 epochs = 330
# steps; 64 patches of 4 px), k-NN of the target encoder (random-init vit_tiny: 55.3%, its CLS features of
# different images have cosine 0.97). Tried: K 128 with the paper's 256-d projection: CE stayed at log K and
# the targets flattened (mean largest target probability 0.14 -> 0.07 by step 80; stopped); K 64 with a 64-d
# projection (as now): 62.5% (linear probe 97.2% vs 96.9%), though the CE stays near log K (3.91 vs 4.16 at
# the end); the same without Sinkhorn: 49.2%, the targets of the batch fall onto 2-3 prototypes. Short runs
# (40 steps) with K 32, base_lr 4e-3, tau 0.05 / tau+ 0.0125 or no masking left the CE as near log K. Hence:
# - epochs 15: the harness's budget;
# - num_prototypes 64: Sinkhorn gives each prototype B/K of the batch's mass; at B = 64 and K = 128 it smears
#   the targets of near-identical images over prototypes (official: B = K = 1024);
# - proj_dim 64: cosines of random unit vectors spread as 1/sqrt(dim), so 64 dimensions give the sharpened
#   targets (tau+ = 0.025) something to sharpen from the first step (largest target probability 0.48 at
#   initialisation vs 0.24 with 256; DINO's small preset makes the same change);
# - n_focal_views 4: each 16-px focal crop costs about a quarter of the masked view on the CPU;
# - base_lr 2e-3 (a peak of 5e-4 at batch 64; the official 1e-3 at batch 1024 scales to 6e-5) with warmup 1:
#   15 warm-up epochs would be the whole run;
# - ema_start 0.99: with 0.996 the target moves little in 330 steps (BYOL's and DINO's presets do the same);
# - focal_crop_scale (0.14, 0.3): 5% of an 8x8 digit upscaled to 32 px is a blob (DINO's preset: 0.14).
PRESETS = {
    "small": dict(epochs=15, num_prototypes=64, proj_dim=64, n_focal_views=4, base_lr=2e-3, warmup_epochs=1,
                  ema_start=0.99, focal_crop_scale=(0.14, 0.3)),
    "pmsn": dict(prior_exponent=0.25),  # PMSN: the power-law prior (see the module docstring)
}
# PMSN on the same data (``--preset pmsn-small``): 63.1% (linear 97.8%); digits are class-balanced, so the
# power law is not expected to help here.
PRESETS["pmsn-small"] = {**PRESETS["small"], **PRESETS["pmsn"]}


# --- augmentations (official make_transforms: 2 random views, then the focal crops) ----------------


def focal_crop_size(cfg: Config, image_size: int) -> int:
    """The focal crops' side: the 96/224 ratio rounded to a multiple of 16 (96 at 224: six 16-px patches;
    16 at 32: four 4-px patches)."""
    return max(16, 16 * round(image_size * cfg.focal_crop_ratio / 16))


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """2 + M - 1 views, each its own v2 pipeline: the target view, the anchor view that forward masks, then
    the focal crops. All share flip, colour jitter (p=0.8), grayscale (p=0.2) and blur (p=0.5, from 64 px).
    Each takes a PIL image or a uint8 tensor."""
    s = cfg.color_jitter_strength

    def make(size: int, scale: tuple[float, float]) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:  # sigma 0.1-2 px (official: PIL radius), kernel 10% of the crop's side
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    focal = focal_crop_size(cfg, image_size)
    return [make(image_size, cfg.rand_crop_scale) for _ in range(2)] + [
        make(focal, cfg.focal_crop_scale) for _ in range(cfg.n_focal_views)]


# --- backbone on masked and resized views, and the head -------------------------------------------

VIT_ATTRIBUTES = ("forward_tokens", "patch_embed", "pos_embed", "cls_token", "blocks", "norm")


# copied from dino.py (the same helper in both files)
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


def random_keep(num_patches: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    """Indices (L',) of the patches left visible: floor(L (1 - ratio)) of them at random, one draw for the
    whole batch (official ``forward_features``: one ``randperm`` per call)."""
    n_keep = math.floor(num_patches * (1 - mask_ratio))
    return torch.randperm(num_patches, device=device)[:n_keep]


def encode_masked(backbone: nn.Module, x: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The CLS token (N, D) of x (N, C, H, W) at the ViT's own size with a random mask_ratio of its patches
    dropped before the encoder: ``forward_tokens`` sees only the kept ones."""
    stride = backbone.patch_embed.stride
    num_patches = (x.shape[-2] // stride[0]) * (x.shape[-1] // stride[1])
    if mask_ratio <= 0:
        return backbone.forward_tokens(x)[:, 0]
    keep = random_keep(num_patches, mask_ratio, x.device).expand(len(x), -1)  # (N, L')
    return backbone.forward_tokens(x, keep)[:, 0]  # (N, D)


def projection_head(in_dim: int, cfg: Config) -> nn.Module:
    """Linear-BN-GELU, Linear-BN-GELU, Linear to proj_dim (official ``init_model``'s ``fc``; truncated
    normal init with std 0.02, zero biases)."""
    hidden = cfg.proj_hidden_dim
    norm = (lambda: nn.BatchNorm1d(hidden)) if cfg.use_bn_in_head else nn.Identity
    head = nn.Sequential(nn.Linear(in_dim, hidden), norm(), nn.GELU(),
                         nn.Linear(hidden, hidden), norm(), nn.GELU(), nn.Linear(hidden, cfg.proj_dim))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


class Encoder(nn.Module):
    """Backbone + projection head (the official encoder carries the head as its ``fc``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head


# --- loss -----------------------------------------------------------------------------------------


# copied from amdim.py (the same helper in several files)
def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllReduceMean(torch.autograd.Function):
    """Mean over ranks; the gradient passes unchanged (official ``AllReduce``): DDP then averages it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous() / dist.get_world_size()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def global_mean(p: torch.Tensor) -> torch.Tensor:
    """p_bar: the mean of p (R, K) over its rows and over ranks (equal shards), (K,)."""
    mean = p.mean(dim=0)  # (K,)
    return _AllReduceMean.apply(mean) if _world()[0] > 1 else mean


@torch.no_grad()
def sinkhorn(p: torch.Tensor, iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp on targets p (B, K) of the global batch (official ``distributed_sinkhorn``): each
    prototype gets total mass B/K, then each row is renormalised to sum to 1 (the last step). Sums over the
    batch are all-reduced."""
    world = _world()[0]
    q = p.float().T.clone()  # (K, B)
    k, b = q.shape[0], q.shape[1] * world

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t)
        return t

    q /= reduce(q.sum())
    for _ in range(iterations):
        q /= reduce(q.sum(dim=1, keepdim=True)) * k  # rows: 1/K per prototype
        q /= q.sum(dim=0, keepdim=True) * b  # columns: 1/B per sample (local)
    return (q * b).T  # (B, K), rows sum to 1


def power_law_prior(k: int, exponent: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """pi_k ~ k^(-exponent), k = 1..K, normalised (K,); exponent 0 gives the uniform prior of ME-MAX."""
    pi = torch.arange(1, k + 1, device=device, dtype=dtype) ** -exponent
    return pi / pi.sum()


def prior_kl(p_bar: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(p_bar || prior) = sum_k p_bar_k log(p_bar_k / prior_k); with the uniform prior, log K - H(p_bar)."""
    return (torch.xlogy(p_bar, p_bar) - p_bar * prior.log()).sum()


def msn_loss(anchor_z: torch.Tensor, target_z: torch.Tensor, prototypes: torch.Tensor, temperature: float,
             target_temperature: float, prior: torch.Tensor, me_max_weight: float = 1.0,
             sinkhorn_iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MSN / PMSN objective (Sec. 3). anchor_z: (M B, D) projections of the anchor views, view-major
    (view m of image i at row m B + i); target_z: (B, D) of the target views (no gradient); prototypes:
    (K, D); prior: (K,). Returns (loss, cross-entropy, KL(p_bar || prior), targets (B, K))."""
    q = F.normalize(prototypes.float(), dim=-1)  # (K, D)
    log_p = F.log_softmax(F.normalize(anchor_z.float(), dim=-1) @ q.T / temperature, dim=-1)  # (M B, K)
    with torch.no_grad():
        cos_t = F.normalize(target_z.detach().float(), dim=-1) @ q.T  # (B, K), no gradient to the prototypes
        targets = F.softmax(cos_t / target_temperature, dim=-1)  # sharpened: tau+ < tau
        if sinkhorn_iterations > 0:
            targets = sinkhorn(targets, sinkhorn_iterations)
    views = len(anchor_z) // len(target_z)
    ce = -(targets.repeat(views, 1) * log_p).sum(dim=-1).mean()  # 1/(M B) sum_{i,m} H(p+_i, p_{i,m})
    reg = prior_kl(global_mean(log_p.exp()), prior.to(log_p))  # ME-MAX: KL(p_bar || U) = log K - H(p_bar)
    return ce + me_max_weight * reg, ce, reg, targets


def ema_momentum(step: int, total_steps: int, cfg: Config) -> float:
    """m after ``step`` steps: linear from ema_start towards ema_end, reached after ema_stretch x the run
    (official ``momentum_scheduler``)."""
    horizon = max(1.0, cfg.ema_stretch * total_steps)
    return min(cfg.ema_end, cfg.ema_start + (cfg.ema_end - cfg.ema_start) * step / horizon)


# copied from dino.py (the same helper in both files)
@torch.no_grad()
def ema_update_parameters(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- lambda theta_t + (1 - lambda) theta_s, parameters only (official code): the teacher's BN
    statistics are its own, from its forward passes on the global crops; the student's also come from the
    local crops, at another resolution."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - momentum)


# --- model ----------------------------------------------------------------------------------------


class MSN(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        missing = [a for a in VIT_ATTRIBUTES if not hasattr(backbone, a)]
        if missing:
            raise ValueError(f"MSN masks patch tokens and needs a ViT backbone (e.g. --backbone vit_tiny); "
                             f"this {type(backbone).__name__} has no {', '.join(missing)}")
        self.cfg = cfg
        self.anchor = Encoder(backbone, projection_head(feature_dim, cfg))
        self.target = copy.deepcopy(self.anchor).requires_grad_(False)  # same initial weights
        bound = 1 / math.sqrt(cfg.proj_dim)  # official: uniform(-1/sqrt(d), 1/sqrt(d))
        self.prototypes = nn.Parameter(torch.empty(cfg.num_prototypes, cfg.proj_dim).uniform_(-bound, bound))
        self.momentum = cfg.ema_start

    @property
    def backbone(self) -> nn.Module:
        return self.anchor.backbone

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        target_view, anchor_view, *focal = batch["views"]  # (N, C, H, W) x 2, then M - 1 focal (N, C, h, w)
        # the official encoder applies its head per resolution group: the masked anchors, then the focal crops
        z = [self.anchor.head(encode_masked(self.anchor.backbone, anchor_view, cfg.mask_ratio))]  # (N, d)
        if focal:
            z.append(self.anchor.head(encode(self.anchor.backbone, torch.cat(focal))))  # ((M - 1) N, d)
        with torch.no_grad():
            z_target = self.target.head(encode(self.target.backbone, target_view))  # (N, d), unmasked
        prior = power_law_prior(cfg.num_prototypes, cfg.prior_exponent, device=z_target.device)
        loss, ce, reg, targets = msn_loss(torch.cat(z), z_target, self.prototypes, cfg.temperature,
                                          cfg.target_temperature, prior, cfg.me_max_weight,
                                          cfg.sinkhorn_iterations)
        with torch.no_grad():
            used = (torch.bincount(targets.argmax(dim=-1), minlength=cfg.num_prototypes) > 0).sum()
        return {"loss": loss, "ce": ce.detach(), "me_max": reg.detach(),
                "target_max": targets.max(dim=-1).values.mean(), "prototypes_used": used.float(),
                "momentum": torch.tensor(self.momentum)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the target follows the anchor encoder; ``step`` counts finished steps."""
        self.momentum = ema_momentum(step, total_steps, self.cfg)
        ema_update_parameters(self.target, self.anchor, self.momentum)

    def param_groups(self) -> list[dict]:
        """Weight decay on weights, none on biases, norm parameters and prototypes (official ``init_opt``)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or p is self.prototypes else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0, "lars": False}]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The target encoder's CLS token, without the head: the official evaluation loads the
        ``target_encoder`` and drops its ``fc`` (``logistic_eval.py``)."""
        return encode(self.target.backbone, x)


MODEL = MSN


if __name__ == "__main__":
    z, zt, protos = torch.randn(44, 16), torch.randn(4, 16), torch.randn(32, 16)
    for exponent in (0.0, 0.25):  # MSN, PMSN
        loss, ce, reg, _ = msn_loss(z, zt, protos, 0.1, 0.025, power_law_prior(32, exponent))
        print(f"prior exponent {exponent}: loss {loss.item():.3f} = ce {ce.item():.3f} + kl {reg.item():.3f}")
