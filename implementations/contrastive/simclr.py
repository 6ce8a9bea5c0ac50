"""SimCLR — Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations". ICML 2020, arXiv:2002.05709. Catalog id: ``simclr``.

Two augmented views of each of N images give 2N projections z = g(f(x)). For a positive pair (i, j),
NT-Xent (Eq. 1) is

    l(i, j) = -log  exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t),

with sim the cosine similarity; the loss averages l over all 2N anchors (both orders of every pair).

Collapse: the 2(N-1) other samples of the batch are negatives in the denominator, so a constant
embedding has loss log(2N - 1), the maximum at a given temperature.

Distributed: negatives come from the global batch. Projections are all-gathered (with gradient) across
ranks, each rank scores its own anchors against every projection, and the mean over ranks equals the
single-process loss on the concatenated batch.

Deviations: the Gaussian blur is dropped below 64 px, as the paper does for CIFAR-10 (App. B.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    temperature: float = 0.1
    """NT-Xent temperature t; 0.1 for ImageNet with batch 4096 (Table 5, App. B.1); 0.5 for CIFAR-10 (B.9)."""
    proj_hidden_dim: int = 2048
    """Hidden width of the projection head g; the ResNet-50 feature width (Sec. 2.1)."""
    proj_dim: int = 128
    """Output dimension of g (Sec. 2.1, Fig. 8)."""
    colour_strength: float = 1.0
    """Colour-distortion strength s (App. A)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (App. A)."""
    optimizer: str = "lars"
    """LARS for large batches (Sec. 2.2)."""
    base_lr: float = 0.3
    """Learning rate per 256 images: lr = 0.3 x batch/256 (Sec. 2.2, App. B.1)."""
    weight_decay: float = 1e-6
    """Sec. 2.2."""
    momentum: float = 0.9
    warmup_epochs: int = 10
    """Linear warm-up, then cosine decay without restarts (Sec. 2.2)."""
    epochs: int = 100
    """100 in the ablations; 1000 for the best results (Table 6)."""
    batch_size: int = 4096
    """Sec. 2.2."""
    sync_batchnorm: bool = True
    """Global BN: statistics aggregated over all devices (Sec. 2.2)."""


# Small-scale preset for CPU runs on tiny images (the embedded digits): 8% crops of an 8x8 digit upscaled
# to 32 px leave a blob, so crops keep at least 40% of the image. Everything else is the paper's.
PRESETS = {"small": dict(min_scale=0.4)}


# --- augmentations (App. A) ---------------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from the same distribution T: crop, flip, colour jitter (p=0.8), grayscale (p=0.2),
    blur (p=0.5) (App. A). Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""
    s = cfg.colour_strength
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if image_size >= 64:
        kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads ----------------------------------------------------------------------------------------


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """g(h) = W2 ReLU(BN(W1 h)) (Sec. 2.1, with BN as in the released code)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


# --- loss -----------------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(concatenation of x over ranks, offset of this rank's rows); x itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(_GatherWithGrad.apply(x)), dist.get_rank() * x.shape[0]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Eq. 1) averaged over the 2N anchors. z1, z2: (N, D) projections of the two views."""
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all1, offset = gather_with_grad(z1)  # (N_global, D)
    all2, _ = gather_with_grad(z2)
    keys = torch.cat([all1, all2])  # (2 N_global, D)
    queries = torch.cat([z1, z2])  # (2N, D)
    logits = queries @ keys.T / temperature  # (2N, 2 N_global)
    n_global = all1.shape[0]
    rows = torch.arange(2 * n, device=z1.device)
    local = torch.arange(n, device=z1.device) + offset
    self_col = torch.cat([local, local + n_global])  # where each query sits among the keys
    pos_col = torch.cat([local + n_global, local])  # its other view
    logits[rows, self_col] = float("-inf")  # k != i in the denominator
    return F.cross_entropy(logits, pos_col)


# --- model ----------------------------------------------------------------------------------------


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        z1 = self.projector(self.backbone(x1))  # (N, proj_dim)
        z2 = self.projector(self.backbone(x2))
        loss = nt_xent(z1, z2, self.cfg.temperature)
        with torch.no_grad():
            pos_sim = F.cosine_similarity(z1, z2).mean()
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Representation h = f(x) used downstream (the projection is discarded, Sec. 2.1)."""
        return self.backbone(x)


MODEL = SimCLR


if __name__ == "__main__":
    z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
    print("random:", nt_xent(z1, z2, 0.1).item(), "aligned:", nt_xent(z1, z1, 0.1).item())
