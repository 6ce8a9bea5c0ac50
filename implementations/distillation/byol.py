"""BYOL — Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Avila Pires, Guo, Gheshlaghi Azar,
Piot, Kavukcuoglu, Munos, Valko. "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning".
NeurIPS 2020, arXiv:2006.07733. Catalog id: ``byol``.

An online network (encoder f, projector g, predictor q) predicts the target network's projection of
another view. With normalised vectors (Eq. 2),

    L(v, v') = || q(z) / ||q(z)|| - z' / ||z'|| ||^2 = 2 - 2 cos(q(z), z'),

where z = g(f(v)) is online and z' = g_xi(f_xi(v')) is the target; the loss is symmetrised by swapping
the views (L_total = L(v, v') + L(v', v), Sec. 3.1). The target receives no gradient; after each step,
xi <- tau xi + (1 - tau) theta with tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (Sec. 3.2).

Collapse: no negatives. The predictor and the slowly moving, gradient-free target break the symmetry
that would let both branches settle on a constant (Sec. 3.2 and the ablations of Table 5).

Distributed: the loss is per sample, so only the gradient averaging of DDP is needed; BN statistics are
global with SyncBatchNorm, as in the paper.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 4096
    """Hidden width of projector and predictor MLPs (Sec. 3.3)."""
    proj_dim: int = 256
    """Output dimension of projector and predictor (Sec. 3.3)."""
    tau_base: float = 0.996
    """Base EMA rate of the target, increased to 1 with a cosine schedule (Sec. 3.3)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (App. B, Table 6)."""
    optimizer: str = "lars"
    """LARS with cosine decay, no LARS adaptation or weight decay on biases and BN (Sec. 3.3)."""
    base_lr: float = 0.2
    """lr = 0.2 x batch/256 (Sec. 3.3)."""
    weight_decay: float = 1.5e-6
    """Sec. 3.3."""
    momentum: float = 0.9
    warmup_epochs: int = 10
    """Sec. 3.3."""
    epochs: int = 1000
    """Sec. 3.3 (300 in some ablations)."""
    batch_size: int = 4096
    """Sec. 3.3."""
    sync_batchnorm: bool = True


# Small-scale preset for CPU runs (a few hundred steps at batch 64 on the embedded digits):
# - tau_base 0.99: with 0.996 the target would barely leave its initialisation in so few steps;
# - base_lr 2.0: LARS with linear scaling gives tiny steps at small batches (SimCLR App. B.1 recommends
#   square-root scaling there), 2.0 x 64/256 = 0.5;
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob.
PRESETS = {"small": dict(tau_base=0.99, base_lr=2.0, min_scale=0.4)}


# --- augmentations (App. B, Table 6): two asymmetric distributions T and T' -----------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """The views from T and T' (App. B, Table 6): T always blurs; T' blurs with p=0.1 and solarises
    with p=0.2. Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""

    def make(blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:  # a 23-px kernel at 224 px is about 10% of the side
            kernel = int(0.1 * image_size) // 2 * 2 + 1
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        steps += [v2.RandomSolarize(threshold=128, p=solarize_p)]  # on uint8 values, before the conversion
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    return [make(1.0, 0.0), make(0.1, 0.2)]


# --- heads ----------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear - BN - ReLU - Linear (Sec. 3.3), used for the projector and the predictor."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


# --- loss and schedule ---------------------------------------------------------------------------


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. 2 averaged over the batch: 2 - 2 cos(p, z). p: (N, D) predictions, z: (N, D) targets (no grad)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1_t: torch.Tensor, z2_t: torch.Tensor) -> torch.Tensor:
    """Symmetrised loss: view-1 prediction vs view-2 target plus the swap (Sec. 3.1)."""
    return regression_loss(p1, z2_t) + regression_loss(p2, z1_t)


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


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.online = nn.Sequential(backbone, mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim))
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.tau = cfg.tau_base

    @property
    def backbone(self) -> nn.Module:
        return self.online[0]

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        p1 = self.predictor(self.online(x1))  # (N, proj_dim)
        p2 = self.predictor(self.online(x2))
        with torch.no_grad():
            z1_t, z2_t = self.target(x1), self.target(x2)  # (N, proj_dim), no gradient
        loss = byol_loss(p1, p2, z1_t, z2_t)
        return {"loss": loss, "tau": torch.tensor(self.tau)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA update of the target after the optimizer step; ``step`` counts finished steps."""
        self.tau = ema_rate(step, total_steps, self.cfg.tau_base)
        ema_update(self.target, self.online, self.tau)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The online encoder's representation y = f(x) (Sec. 3.3: used for evaluation)."""
        return self.backbone(x)


MODEL = BYOL


if __name__ == "__main__":
    p, z = torch.randn(8, 256), torch.randn(8, 256)
    print("random:", byol_loss(p, p, z, z).item(), "aligned:", byol_loss(z, z, z, z).item())
