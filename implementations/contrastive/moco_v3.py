"""MoCo v3 — Chen, Xie, He. "An Empirical Study of Training Self-Supervised Vision Transformers".
ICCV 2021, arXiv:2104.02057. Catalog id: ``moco-v3``. Official code: facebookresearch/moco-v3.

Two views x1, x2 of each image. The base encoder f_q (backbone + projector) followed by a predictor gives
the queries q1, q2; the momentum encoder f_k (a moving average of backbone + projector, no predictor) gives
the keys k1, k2. There is no queue: the keys of the other images in the (global) batch are the negatives.
With q and k L2-normalised, the contrastive loss of Alg. 1 (InfoNCE, Eq. 1, scaled by 2 tau) is

    ctr(q, k) = 2 tau * mean_i [ -log  exp(q_i . k_i / tau) / sum_{j=1}^{N} exp(q_i . k_j / tau) ],

and the loss is symmetrised over the views: L = ctr(q1, k2) + ctr(q2, k1). f_k receives no gradient;
after each optimizer step theta_k <- m theta_k + (1 - m) theta_q, with m raised from 0.99 to 1 by a
half-cycle cosine (official ``--moco-m-cos``). The 2 tau factor (Alg. 1) makes the loss less sensitive to
tau at a fixed lr and weight decay. With a ViT backbone the patch projection is frozen at its random
initialisation (Sec. 4, "a trick for improving stability"): the parameters of a submodule named
``patch_embed`` (this harness's ViT, timm's and the official code's) get ``requires_grad = False``, so they
receive no gradient and the optimizer never holds them; a backbone without one (a CNN) is left as it is.

Two recipes. The default is the ViT one, the paper's main setting (Sec. 5 describes ViT + MoCo v3; the
ResNet-50 runs are the baseline of Sec. 3): AdamW, tau = 0.2, a 3-layer projector and a predictor that
both end in BN. ``PRESETS["resnet"]`` is the official ResNet-50 recipe: LARS, tau = 1.0, a 2-layer
projector, a predictor without the last BN, crops of at least 20%. Every layer of both MLPs has BN;
hidden layers are 4096-d with ReLU, outputs 256-d (official ``_build_mlp``; the last BN has no affine).

Collapse: the other N - 1 keys of the batch are negatives. A constant embedding makes every logit equal,
so ctr = 2 tau log N and L = 4 tau log N, the loss of indistinguishable images; the momentum encoder
keeps the keys consistent from step to step, and the predictor adds the asymmetry of BYOL.

Distributed: keys are gathered over ranks without gradient (``concat_all_gather``), so each query is
scored against the N_global keys, its positive at column rank * N + i (labels offset by rank, as the
official code does; every rank holds N images). The loss is a mean over this rank's queries, and DDP's
gradient averaging gives the gradient of the loss on the global batch. BN statistics are global with
SyncBatchNorm (official code).

Deviations:
- the momentum encoder follows in ``on_step_end``, after the optimizer step, as in Alg. 1 (the official
  PyTorch code updates it at the start of the next forward, which is the same sequence of encoders);
- ``ema_update`` (shared with BYOL) also copies BN running statistics into the momentum encoder; the
  official code leaves it its own. Both train with batch statistics, so the loss is the same;
- the patch projection keeps the backbone's own random initialisation (the official ViT re-initialises it
  Xavier-uniform before freezing it); ResNets are not built with ``zero_init_residual`` here;
- biases and norm parameters get no weight decay (the harness's optimizer groups); the official AdamW
  decays all parameters (its LARS exempts them, as here);
- the paper describes a 3-layer projector; for ResNet the ``resnet`` preset follows the official
  ``MoCo_ResNet`` (2 layers, no BN on the predictor's output);
- the Gaussian blur is dropped below 64 px, as SimCLR does for CIFAR-10 (its App. B.9); the flip comes
  right after the crop instead of last, which leaves the distribution of views unchanged (flip commutes
  with the per-pixel colour ops, and with a symmetric blur kernel).
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
    temperature: float = 0.2
    """tau: 0.2 for ViT (Sec. 5; official README, ``--moco-t=.2`` in every ViT command); 1.0 for ResNet-50
    (official ``--moco-t`` default, used by its ResNet-50 commands)."""
    proj_layers: int = 3
    """Linear layers of the projector: 3 for ViT (Sec. 5, "MLP heads"; official ``MoCo_ViT``); the
    official ``MoCo_ResNet`` uses 2."""
    pred_last_bn: bool = True
    """BN on the predictor's output: yes for ViT (official ``MoCo_ViT``), no for ResNet (``MoCo_ResNet``)."""
    proj_hidden_dim: int = 4096
    """Hidden width of projector and predictor (Sec. 5; official ``--moco-mlp-dim``)."""
    proj_dim: int = 256
    """Output width of projector and predictor, the dimension of q and k (Sec. 5; official ``--moco-dim``)."""
    key_momentum: float = 0.99
    """Base m of the momentum encoder, raised to 1 by a half-cycle cosine (official ``--moco-m`` 0.99
    with ``--moco-m-cos`` in every ResNet-50 and ViT command; 0.996 for its 1000-epoch ResNet-50)."""
    freeze_patch_embed: bool = True
    """Keep a ViT's patch projection at its random init (Sec. 4; official ``--stop-grad-conv1`` in every ViT
    command); no effect on a backbone without a ``patch_embed``."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop: 0.08 for ViT (official ``--crop-min`` default,
    not changed by its ViT commands); 0.2 for ResNet-50 (its ResNet-50 commands)."""
    optimizer: str = "adamw"
    """AdamW for ViT (Sec. 4.1 compares it with LAMB; official ViT commands); LARS for ResNet-50."""
    base_lr: float = 1.5e-4
    """lr = 1.5e-4 x batch/256 for ViT (official ViT commands, ``--lr=1.5e-4``); 0.6 for 100-epoch ResNet-50
    (official ``--lr`` default; 0.3 for its 300- and 1000-epoch runs)."""
    weight_decay: float = 0.1
    """0.1 for ViT (official ViT commands); 1e-6 for ResNet-50 (official ``--wd`` default)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas: not stated in the paper; the official code uses PyTorch's defaults."""
    momentum: float = 0.9
    """LARS momentum (official ``--momentum``); AdamW does not use it."""
    warmup_epochs: int = 40
    """Linear warm-up, then cosine decay: 40 epochs for ViT (Sec. 5; official ViT commands); 10 for
    ResNet-50 (official ``--warmup-epochs`` default)."""
    epochs: int = 300
    """300 for ViT (official CONFIG.md: all ViT models); 100 for the default ResNet-50 run."""
    batch_size: int = 4096
    """Sec. 5 (and Sec. 4.1's batch-size study); official ``-b`` default."""
    sync_batchnorm: bool = True
    """SyncBN in the MLP heads (and the ResNet), as the official code converts every BN."""


# The official ResNet-50 recipe (main_moco.py defaults, README / CONFIG.md 100-epoch command).
RESNET = dict(temperature=1.0, proj_layers=2, pred_last_bn=False, min_scale=0.2,
              optimizer="lars", base_lr=0.6, weight_decay=1e-6, warmup_epochs=10, epochs=100)

PRESETS = {
    "resnet": RESNET,
    # CPU runs on the embedded digits with small_cnn (batch 64, 15 epochs = 330 steps, 1,437 images of 32 px):
    # the ResNet recipe (a CNN backbone: LARS, 2-layer projector, predictor without the last BN) with
    # - temperature 0.2 (the paper's ViT value): with 63 negatives instead of 4095, tau = 1.0 leaves the
    #   softmax nearly flat (loss 14.8 after 330 steps, collapse is 4 log 64 = 16.6); k-NN 86.7% with 1.0,
    #   89.2% with 0.2 (random init 83.9%);
    # - base_lr 2.0: LARS with linear scaling gives tiny steps at batch 64 (0.6 x 64/256 = 0.15; BYOL's
    #   preset makes the same change); not tuned further;
    # - warmup_epochs 2: 10 of 15 epochs would be capped at half the run by the harness;
    # - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as in SimCLR's preset).
    "small": {**RESNET, "temperature": 0.2, "base_lr": 2.0, "warmup_epochs": 2, "min_scale": 0.4},
    # The same data with --backbone vit_tiny (``--preset small-vit``): the ViT recipe with
    # - base_lr 1.5e-3: 1.5e-4 x 64/256 barely moves a ViT in 330 steps (not measured: a run of it on the
    #   shared 2-core CPU would take over an hour);
    # - warmup_epochs 2 and min_scale 0.4, as above.
    "small-vit": dict(base_lr=1.5e-3, warmup_epochs=2, min_scale=0.4),
}


# --- augmentations (official main_moco.py, BYOL's recipe: App. B of BYOL) --------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """BYOL's two asymmetric views, as the official code draws them: the first always blurs; the second
    blurs with p=0.1 and solarises with p=0.2. Each view is one v2 pipeline; it takes a PIL image or a
    uint8 tensor."""

    def make(blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # "not strengthened" (official)
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:
            kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        steps += [v2.RandomSolarize(threshold=128, p=solarize_p)]  # on uint8 values, before the conversion
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    return [make(1.0, 0.0), make(0.1, 0.2)]


# --- heads ----------------------------------------------------------------------------------------


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Module:
    """Linear (no bias) - BN - ReLU for every hidden layer, then Linear and, if ``last_bn``, a BN without
    affine parameters (Sec. 5: BN in every layer, following SimCLR; official ``_build_mlp``)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def freeze_patch_embedding(backbone: nn.Module) -> list[str]:
    """Random patch projection (Sec. 4): every parameter of a submodule named ``patch_embed`` stops
    requiring gradients, so it keeps its random init. Returns the names of the frozen parameters (none for
    a backbone without a patch embedding)."""
    frozen = []
    for name, module in backbone.named_modules():
        if name.split(".")[-1] == "patch_embed":
            for p_name, p in module.named_parameters():
                p.requires_grad_(False)
                frozen.append(f"{name}.{p_name}")
    return frozen


# --- loss and schedule ---------------------------------------------------------------------------


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """ctr(q, k) of Alg. 1: InfoNCE (Eq. 1) of each query against the keys of the global batch, its own
    key the positive, scaled by 2 tau. q: (N, D) queries; k: (N, D) keys of the same images (no gradient)."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    k_all = concat_all_gather(k)  # (N_global, D)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    logits = q @ k_all.T / temperature  # (N, N_global)
    labels = torch.arange(len(q), device=q.device) + rank * len(q)  # this rank's rows of the global batch
    return F.cross_entropy(logits, labels) * (2 * temperature)  # Alg. 1: 2 tau * CE


def moco_v3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetrised loss of Alg. 1: ctr(q1, k2) + ctr(q2, k1). All (N, D)."""
    return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)


# ema_rate and ema_update are BYOL's (byol.py, its Sec. 3.2), kept identical; the official
# adjust_moco_momentum is the same half-cycle cosine, m = 1 - (1 - m_base)(cos(pi k / K) + 1) / 2.
def ema_rate(step: int, total_steps: int, tau_base: float) -> float:
    """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (Sec. 3.2)."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


# --- model ----------------------------------------------------------------------------------------


class MoCoV3(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.frozen = freeze_patch_embedding(backbone) if cfg.freeze_patch_embed else []
        hidden, dim = cfg.proj_hidden_dim, cfg.proj_dim
        self.base_encoder = nn.Sequential(backbone, mlp(cfg.proj_layers, feature_dim, hidden, dim))  # f_q without h
        self.predictor = mlp(2, dim, hidden, dim, last_bn=cfg.pred_last_bn)  # only on the query branch
        self.momentum_encoder = copy.deepcopy(self.base_encoder).requires_grad_(False)  # f_k: same initial weights
        self.m = cfg.key_momentum

    @property
    def backbone(self) -> nn.Module:
        return self.base_encoder[0]

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        q1 = self.predictor(self.base_encoder(x1))  # (N, proj_dim)
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)  # (N, proj_dim), no gradient
        loss = moco_v3_loss(q1, q2, k1, k2, self.cfg.temperature)
        with torch.no_grad():
            pos_sim = (F.cosine_similarity(q1, k2).mean() + F.cosine_similarity(q2, k1).mean()) / 2
        return {"loss": loss, "pos_sim": pos_sim, "key_momentum": torch.tensor(self.m)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step (Alg. 1): f_k <- m f_k + (1 - m) f_q, m on its cosine schedule;
        ``step`` counts finished steps. A loop of one's own must call this after every step."""
        self.m = ema_rate(step, total_steps, self.cfg.key_momentum)
        ema_update(self.momentum_encoder, self.base_encoder, self.m)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The base encoder's backbone features (the CLS token for a ViT), without projector or predictor:
        what the official linear probe evaluates."""
        return self.backbone(x)


MODEL = MoCoV3


if __name__ == "__main__":
    q1, q2, k1, k2 = (torch.randn(8, 256) for _ in range(4))
    print("random:", moco_v3_loss(q1, q2, k1, k2, 0.2).item(), "aligned:", moco_v3_loss(k2, k1, k1, k2, 0.2).item(),
          "collapsed:", moco_v3_loss(*(torch.ones(8, 256),) * 4, 0.2).item(), "= 4 tau log N:", 0.8 * math.log(8))
