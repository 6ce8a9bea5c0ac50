"""TiCo — Zhu, Moraes, Karakulak, Sobol, Canziani, LeCun. "TiCo: Transformation Invariance and Covariance
Contrast for Self-Supervised Visual Representation Learning". arXiv preprint 2022, arXiv:2206.10698.
Catalog id: ``tico``. Official code: none released that could be found (the unofficial ports are
sayannag/TiCo-pytorch and lightly's ``TiCoLoss``).

Two views of each of N images give embeddings z = normalize(g(f(x))) and z' = normalize(g(f(x'))) on the
unit sphere, Z (N, D) the batch of the first view. With the running second-moment ("covariance") matrix

    B_t = 1/N Z^T Z                                    this batch's (uncentred) covariance
    C_t = beta C_{t-1} + (1 - beta) B_t,   C_0 = 0     exponential moving average over the steps

the loss of step t is (Eq. 4 and Algorithm 1)

    L_t = - 1/N sum_i z_i . z'_i  +  rho/N sum_i z_i^T C_t z_i,

the transformation-invariance term (minus the mean cosine similarity of the two views; -1 for identical
views) plus the covariance-contrast term. The loss of step t uses C_t, which already includes the current
batch, and C_{t-1} enters as a constant; as Algorithm 1 writes it (``B = mm(z_1.T, z_1) / N`` and
``C = beta * C + (1 - beta) * B`` before the loss, ``C = C.detach()`` after the step), the gradient flows
through the current batch's part (1 - beta) B_t as well as through z_i: d/dZ of the second term is
2 rho/N Z C_t + 2 rho (1 - beta)/N^2 Z (Z^T Z). ``cov_grad=False`` stops it there instead (B_t detached,
as lightly's ``TiCoLoss`` does since its PR #1484, reading Fig. 1 as a stop-gradient); see Deviations.

Collapse: sum_i z_i^T C_t z_i / N = sum_i sum_k (z_i . u_k)^2 lambda_k over the eigenpairs of C_t, so an
embedding pays for lying along the dominant directions of the embeddings seen so far. A constant unit
embedding u makes C_t -> u u^T and the second term -> rho, its maximum for unit vectors (trace C_t = 1
for unit embeddings); spreading the embeddings evenly over D directions brings it down to rho/D. With
beta = 0 the term is rho/N^2 sum_ij (z_i . z_j)^2, a contrast against every other sample of the batch
(the paper's analysis reads it with beta > 0 as MoCo whose "memory bank" is the running C, of unlimited
size at O(D^2) memory, and as a Barlow-Twins-like penalty on the Frobenius norm of the covariance).

Distributed: B_t is a statistic of the GLOBAL batch. Both views' embeddings are all-gathered with gradient
(``gather_with_grad``) and every rank computes the loss of the concatenated batch; DDP's averaging of the
world-size-times summed gradient then gives the single-process gradient. C is a registered buffer updated
from the gathered (global) batch, so it is the same on every rank and in a checkpoint.

Deviations:
- The exact paper text could not be read here (only secondary sources: the catalog entry, lightly's code,
  issues and docs quoting the paper, and sayannag/TiCo-pytorch): Algorithm 1's order and gradient are
  taken from the port that reproduces it line by line (sayannag), which lets the gradient through B_t;
  lightly's maintainers read the paper's Fig. 1 as no gradient through B_t (``--set cov_grad=false``).
- The invariance term has no constant: the pseudo-code has none, Eq. 4 is quoted (lightly PR #1016) with a
  leading 1 (1 - mean cosine); a constant does not change the gradient.
- No momentum encoder: both views go through the same f and g, as Algorithm 1 and the loss read; the
  unofficial ports (lightly, sayannag) feed the second view to a BYOL-style EMA copy, which the paper's text
  as quoted does not ask for (not verified in the paper).
- C is updated inside ``forward`` (in training mode only), right after the loss is built, as Algorithm 1
  does; an evaluation-mode forward computes the loss with C_t but leaves the buffer alone.
- Views are BYOL's asymmetric pair, as lightly's ``TiCoTransform`` states the paper uses; the blur is
  dropped below 64 px (SimCLR App. B.9). Crops are bilinear with antialiasing (the batched device path).
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
    beta: float = 0.9
    """Rate of the running covariance C_t = beta C_{t-1} + (1 - beta) B_t: the paper's value as cited by
    lightly's ``TiCoLoss`` ("Defaults to 0.9 [0]") and sayannag's ``--beta``; the paper text not read here."""
    rho: float = 8.0
    """Weight of the covariance-contrast term; 8 is the value recommended in the paper as quoted by lightly
    ("8.0 [0]") and by sayannag's flag help ("Recommended value in the paper = 8.0", its default is 20);
    the paper text not read here. The issue's 20 is sayannag's default, not the paper's."""
    cov_grad: bool = True
    """Gradient through the current batch's part of C_t, as Algorithm 1 computes it (see the docstring);
    False detaches B_t (lightly's reading of Fig. 1)."""
    proj_hidden_dim: int = 4096
    """Projector: Linear(4096) - BN - ReLU - Linear(256), the paper's sentence as quoted in lightly's
    ``TiCoProjectionHead`` (section not verified)."""
    proj_dim: int = 256
    """Embedding dimension D, the projector's output (as above)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (BYOL's recipe, App. B; the paper follows it)."""
    optimizer: str = "lars"
    """Not verified in the paper; BYOL's setting (Sec. 3.3 there), which TiCo's setup is said to follow."""
    base_lr: float = 0.2
    """Not verified in the paper; BYOL's lr = 0.2 x batch/256."""
    weight_decay: float = 1.5e-6
    """Not verified in the paper; BYOL's."""
    momentum: float = 0.9
    """Not verified in the paper; BYOL's LARS momentum."""
    warmup_epochs: int = 10
    """Not verified in the paper; BYOL's."""
    epochs: int = 1000
    """Not verified in the paper (it reports several budgets); BYOL's longest."""
    batch_size: int = 4096
    """Not verified in the paper; lightly's and sayannag's default."""
    sync_batchnorm: bool = True
    """Not stated in what could be read; the projector's BN over the global batch, as BYOL."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; random
# init k-NN 0.839). The paper's projector (256 -> 4096 -> 256, ~2M multiply-adds) is kept.
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets);
# - warmup_epochs 2: ten warm-up epochs would be two thirds of the 15-epoch run;
# - base_lr 1.0: LARS with linear scaling gives tiny steps at batch 64 (1.0 x 64/256 = 0.25): k-NN 0.914;
#   2.0 gave 0.894.
# beta 0.9 and rho 8 are the paper's (k-NN 0.914); with the gradient stopped at B_t (cov_grad=false) 0.894.
PRESETS = {"small": dict(min_scale=0.4, warmup_epochs=2, base_lr=1.0)}


# --- augmentations (BYOL's T and T') ----------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """BYOL's two views: crop, flip, colour jitter (p=0.8), grayscale (p=0.2); blur 1.0 / 0.1, solarisation
    0.0 / 0.2. Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""

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


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """g: Linear - BN - ReLU - Linear (the paper's projector, as quoted by lightly)."""
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


def tico_loss(z1: torch.Tensor, z2: torch.Tensor, cov_prev: torch.Tensor, beta: float = 0.9, rho: float = 8.0,
              cov_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Algorithm 1 on the global batch: (loss, the new running matrix C_t detached, the two terms).

    z1, z2: (N, D) projections of the two views on this rank (normalised here); cov_prev: (D, D) C_{t-1}.
    Under torch.distributed every rank returns the loss and C_t of the concatenated batch."""
    z1, _ = gather_with_grad(F.normalize(z1, dim=1))  # (N_global, D)
    z2, _ = gather_with_grad(F.normalize(z2, dim=1))
    n = z1.shape[0]
    batch_cov = z1.T @ z1 / n  # (D, D) B_t
    if not cov_grad:
        batch_cov = batch_cov.detach()
    cov = beta * cov_prev.detach() + (1 - beta) * batch_cov  # (D, D) C_t, including this batch
    invariance = -(z1 * z2).sum(dim=1).mean()
    contrast = rho * ((z1 @ cov) * z1).sum(dim=1).mean()  # rho/N sum_i z_i^T C_t z_i
    return invariance + contrast, cov.detach(), {"invariance": invariance.detach(), "contrast": contrast.detach()}


# --- model ----------------------------------------------------------------------------------------


class TiCo(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        # C_{t-1}: the running second moment of the first view's embeddings, C_0 = 0 (as both ports start)
        self.register_buffer("cov", torch.zeros(cfg.proj_dim, cfg.proj_dim))

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        z1 = self.projector(self.backbone(x1))  # (N, proj_dim)
        z2 = self.projector(self.backbone(x2))
        c = self.cfg
        loss, cov, terms = tico_loss(z1, z2, self.cov, c.beta, c.rho, c.cov_grad)
        if self.training:
            self.cov.copy_(cov)  # C_{t-1} <- C_t for the next step (Alg. 1: C = C.detach())
        with torch.no_grad():
            # sum lambda^2 / (sum lambda)^2 over the eigenvalues of C_t, without an eigendecomposition:
            # 1 = all embeddings along one direction, 1/D = spread evenly
            purity = (cov * cov).sum() / torch.trace(cov).pow(2)
        return {"loss": loss, **terms, "cov_purity": purity}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation f(x): the projector is discarded after pretraining, as in the linear
        evaluation of the paper's joint-embedding baselines."""
        return self.backbone(x)


MODEL = TiCo


if __name__ == "__main__":
    z, prev = torch.randn(256, 64), torch.zeros(64, 64)
    print("random:", tico_loss(z, torch.randn(256, 64), prev)[0].item(), "identical:", tico_loss(z, z, prev)[0].item(),
          "collapsed:", tico_loss(torch.ones(256, 64), torch.ones(256, 64), prev)[0].item())
