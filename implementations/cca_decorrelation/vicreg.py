"""VICReg — Bardes, Ponce, LeCun. "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning". ICLR 2022, arXiv:2105.04906. Catalog id: ``vicreg``. Official code:
https://github.com/facebookresearch/vicreg (``main_vicreg.py``, ``augmentations.py``).

Two views x, x' of each image go through the encoder f and the expander h, z = h(f(x)), z' = h(f(x')),
and Z, Z' are the (n, d) batches of embeddings; z^j is dimension j of Z over the batch (Sec. 4.1):

    s(Z, Z') = 1/(n d) sum_i ||z_i - z'_i||^2                      invariance (Eq. 5, as F.mse_loss)
    v(Z)     = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps))      variance (Eqs. 1-2)
    C(Z)     = 1/(n - 1) sum_i (z_i - mean(z)) (z_i - mean(z))^T   covariance matrix (Eq. 3)
    c(Z)     = 1/d sum_{i != j} C(Z)_ij^2                            covariance (Eq. 4)
    loss     = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]          (Eq. 6, as the code)

Var is the unbiased variance (divided by n - 1: Eq. 2, ``torch.var`` in the official code and Alg. 1).

Collapse: nothing compares different images. The variance hinge keeps the standard deviation of every
embedding dimension over the batch at gamma (a constant embedding costs gamma - sqrt(eps) per branch), and
the covariance term decorrelates the dimensions, so that they cannot all carry the same signal
(informational collapse). The hinge acts on the standard deviation, not the variance: the gradient of the
std does not shrink with the spread of the batch, that of the variance does (Sec. 4.1). Without the
variance term the embeddings collapse (Table 7).

Distributed: all three terms are statistics of the GLOBAL batch. Both views' embeddings are all-gathered
with gradient (``gather_with_grad``: each rank's rows receive the sum of every rank's gradient) and every
rank computes the same loss on the concatenated batch; DDP's averaging of the world-size-times summed
gradient then gives the single-process gradient. The official code gathers the same way for the variance
and covariance (``FullGatherLayer``) and takes the invariance on the local rows, which for equal shards
has the same rank mean and gradient; here it is taken on the gathered rows too, so that every rank logs
the global loss. The expander's BN is global with SyncBatchNorm, as the official code converts it.

Deviations:
- The variance terms of the two branches are averaged (``mu [v(Z) + v(Z')] / 2``), as ``main_vicreg.py``
  computes them and as the coefficients of its flags (25, 25, 1) are set; Eq. 6 and Alg. 1 add them, which is
  ``--set mu=50`` here (official issues #8 and #26 raise the difference). The invariance is
  ``F.mse_loss``, the mean over the n d entries, as in Alg. 1 and the code; Eq. 5 divides by n alone.
- Views: the paper's symmetric recipe (App. C.1: blur p = 0.5, solarisation p = 0.1 in both views) is the
  default; the official ``augmentations.py`` uses BYOL's asymmetric pair (blur 1.0 / 0.1, solarisation
  0.0 / 0.2): ``--set blur_prob=1.0,0.1 --set solarize_prob=0.0,0.2``. Crops are resized bilinearly with
  antialiasing (the code uses bicubic), which is what the harness runs batched on the device. The blur kernel
  is 10% of the side (23 px at 224, App. C.1), sigma in [0.1, 2] (the code's); it is dropped below 64 px,
  as SimCLR does on CIFAR-10 (SimCLR App. B.9).
- Optimiser and schedule are the harness's: LARS (eta 0.001, biases and norm parameters excluded, as the
  code's ``exclude_bias_and_norm``) with linear warm-up and cosine decay to 0; the paper and the code end at
  0.001 x the peak rate (Sec. 4.2: "final value of 0.002").
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
    lambd: float = 25.0
    """Invariance coefficient lambda (Sec. 4.2; official ``--sim-coeff``; Table 7 grid)."""
    mu: float = 25.0
    """Variance coefficient mu (Sec. 4.2; official ``--std-coeff``), on the mean of the two branches' terms."""
    nu: float = 1.0
    """Covariance coefficient nu (Sec. 4.2; official ``--cov-coeff``)."""
    gamma: float = 1.0
    """Target standard deviation of each embedding dimension (Sec. 4.1: "fixed to 1 in our experiments")."""
    eps: float = 1e-4
    """Added to the variance under the square root (Eq. 2; Sec. 4.2: "0.0001"; the code's 0.0001)."""
    proj_hidden_dim: int = 8192
    """Width of the expander's hidden layers (Sec. 4.2: "The sizes of all 3 layers were set to 8192")."""
    proj_dim: int = 8192
    """Embedding dimension d, the expander's output (Sec. 4.2; official ``--mlp 8192-8192-8192``)."""
    proj_layers: int = 3
    """Linear layers of the expander: two with BN and ReLU, then a linear one (Sec. 4.2)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (App. C.1: "between 0.08 to 1.0")."""
    blur_prob: tuple[float, float] = (0.5, 0.5)
    """Gaussian-blur probability of each view (App. C.1: 0.5, symmetrised; the official code: 1.0, 0.1)."""
    solarize_prob: tuple[float, float] = (0.1, 0.1)
    """Solarisation probability of each view (App. C.1: 0.1, symmetrised; the official code: 0.0, 0.2)."""
    optimizer: str = "lars"
    """LARS (Sec. 4.2), excluding biases and norm parameters from decay and adaptation (official code)."""
    base_lr: float = 0.2
    """lr = batch_size / 256 x base_lr with base_lr 0.2 (Sec. 4.2; official ``--base-lr``)."""
    weight_decay: float = 1e-6
    """Sec. 4.2 (official ``--wd``)."""
    momentum: float = 0.9
    """Not stated in the paper; the official LARS default."""
    warmup_epochs: int = 10
    """Linear warm-up from 0 over 10 epochs, then cosine decay (Sec. 4.2)."""
    epochs: int = 1000
    """Sec. 4.2 (100 in the ablations, App. C.4, where base_lr is 0.3)."""
    batch_size: int = 2048
    """Sec. 4.2 (official ``--batch-size``, the global batch)."""
    sync_batchnorm: bool = True
    """Not stated in the paper; the official code converts the model to SyncBatchNorm."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# k-NN figures are from `selfsup train vicreg --set ...` runs, random init 0.839):
# - proj_hidden_dim, proj_dim 1024: three 8192-wide layers would cost ~136M multiply-adds per image, nine
#   times the small CNN; the expander stays wider than the 256-d representation, as Sec. 4.2 wants
#   (2048 gave 0.850 at 1.6x the step time, 1024 gave 0.886);
# - warmup_epochs 2: ten warm-up epochs would be two thirds of the 15-epoch run (the harness caps them at
#   half of it): 0.883 with 10, 0.886 with 2;
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets).
# Everything else is the paper's, base_lr 0.2 included: 1.0 (a peak lr of 0.25, 2 warm-up epochs) lowered
# the invariance faster but gave 0.850. In 330 steps the std of the embeddings stays near 0.3 (variance
# term ~0.7).
PRESETS = {"small": dict(proj_hidden_dim=1024, proj_dim=1024, warmup_epochs=2, min_scale=0.4)}


# --- augmentations (App. C.1) ----------------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views: crop, flip, colour jitter (p=0.8), grayscale (p=0.2), blur, solarisation (App. C.1), the
    blur and solarisation probabilities per view from ``cfg``. Each view is one v2 pipeline; it takes a PIL
    image or a uint8 tensor."""

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

    return [make(b, s) for b, s in zip(cfg.blur_prob, cfg.solarize_prob)]


# --- heads ----------------------------------------------------------------------------------------


def expander(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3) -> nn.Module:
    """h: (layers - 1) x [Linear - BN - ReLU], then a Linear without bias (Sec. 4.2; official ``Projector``)."""
    dims = [in_dim] + [hidden_dim] * (layers - 1)
    blocks: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        blocks += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    blocks.append(nn.Linear(dims[-1], out_dim, bias=False))
    return nn.Sequential(*blocks)


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


def invariance_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """s(Z, Z'): the mean squared difference over all n d entries, as VICReg's Alg. 1 and code compute it."""
    return F.mse_loss(z1, z2)


def variance_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """v(Z) = mean_j max(0, gamma - sqrt(Var(z^j) + eps)), unbiased variance (VICReg Eqs. 1-2). z: (N, D)."""
    std = torch.sqrt(z.var(dim=0) + eps)  # (D,)
    return F.relu(gamma - std).mean()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """c(Z) = sum of the squared off-diagonal entries of C(Z), divided by D (Eqs. 3-4). z: (N, D)."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)  # (D, D), Eq. 3
    # dropping the last entry, the D^2 - 1 others are D - 1 rows of D + 1 that each start on the diagonal
    off = cov.flatten()[:-1].view(d - 1, d + 1)[:, 1:]  # (D - 1, D): the off-diagonal entries, a view
    return off.pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 25.0, mu: float = 25.0, nu: float = 1.0,
                gamma: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 6 on the global batch: (loss, the three unweighted terms). z1, z2: (N, D) embeddings of the two
    views on this rank; under torch.distributed every rank returns the loss of the concatenated batch."""
    z1, _ = gather_with_grad(z1)  # (N_global, D)
    z2, _ = gather_with_grad(z2)
    inv = invariance_loss(z1, z2)
    var = (variance_loss(z1, gamma, eps) + variance_loss(z2, gamma, eps)) / 2  # as main_vicreg.py
    cov = covariance_loss(z1) + covariance_loss(z2)
    loss = lambd * inv + mu * var + nu * cov  # Eq. 6
    return loss, {"invariance": inv, "variance": var, "covariance": cov}


# --- model ----------------------------------------------------------------------------------------


class VICReg(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.expander = expander(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        z1 = self.expander(self.backbone(x1))  # (N, proj_dim)
        z2 = self.expander(self.backbone(x2))
        c = self.cfg
        loss, terms = vicreg_loss(z1, z2, c.lambd, c.mu, c.nu, c.gamma, c.eps)
        with torch.no_grad():
            std = z1.std(dim=0).mean()  # local batch; a value near 0 means collapse
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, "std": std}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation y = f(x): the expander is discarded after pretraining (Sec. 4)."""
        return self.backbone(x)


MODEL = VICReg


if __name__ == "__main__":
    z = torch.randn(256, 64)
    print("random:", vicreg_loss(z, torch.randn(256, 64))[0].item(), "identical:", vicreg_loss(z, z)[0].item(),
          "collapsed:", vicreg_loss(torch.ones(256, 64), torch.ones(256, 64))[0].item())
