"""Barlow Twins — Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction". ICML 2021, arXiv:2103.03230. Catalog id: ``barlow-twins``. Official code:
facebookresearch/barlowtwins.

Two distorted views Y^A, Y^B of a batch of N images go through the same network (backbone + projector) to
embeddings Z^A, Z^B (N, D). Each embedding dimension is standardised over the batch (mean 0, variance 1,
the biased variance, as an affine-free BatchNorm in training mode does), and

    C_ij = (1/N) sum_b za_bi zb_bj                                                  (Eq. 2)

is the cross-correlation matrix (D, D) of the two standardised batches, with entries in [-1, 1]; Eq. 2
writes the same with mean-centred embeddings, C_ij = sum_b za_bi zb_bj / sqrt(sum_b za_bi^2 sum_b zb_bj^2).
(Algorithm 1 divides by ``z.std(0)``, the unbiased std, which scales C by (N - 1)/N; Eq. 2 and the official
code's BatchNorm use the biased one, as here.)
The loss (Eq. 1) pulls C towards the identity:

    L_BT = sum_i (1 - C_ii)^2  +  lambda sum_i sum_{j != i} C_ij^2,

an invariance term (each dimension agrees across the views) and a redundancy-reduction term (different
dimensions are decorrelated), with lambda = 5e-3 (Sec. 2.2; 0.0051 in the official code, the default
here). No negatives, predictor, stop-gradient or
momentum encoder: both branches are the same network and both receive the gradient.

Collapse: a constant embedding has zero variance over the batch, its standardised value is 0 in every
dimension, C = 0 and the invariance term is at its worst, L = D. More generally the diagonal term asks
every dimension to vary over the batch (a standardised dimension can only correlate with its twin if it
varies), and the off-diagonal term stops the dimensions from all carrying the same signal, the
dimensional collapse. Both terms are needed: without the off-diagonal one the paper's ablation loses 14
points, without the diagonal one it learns nothing (Sec. 4, Table 5).

Distributed: C is a statistic of the GLOBAL batch, its standardisation too (the official code
standardises with a SyncBatchNorm and sums the per-rank products over ranks). Here each rank all-gathers
the embeddings of both views with gradient (``gather_with_grad``, whose backward returns to each rank
the summed gradient of its own rows), standardises them and computes C of the whole batch, so every
rank holds the same, global loss; the rank-averaged loss is the loss of the concatenated batch, and after
DDP's gradient averaging so is the gradient (each rank's rows receive the gradient of every rank's copy
of the loss, world_size times the loss's own, and DDP divides by world_size). A plain
``dist.all_reduce`` of C, as in the official code, gives the right value but a backward that is the
identity: each rank's rows then get only their own copy's gradient, and after averaging the gradient is
1/world_size of the global batch's (the bug of lightly issue #1977, fixed there by an autograd-aware
all-reduce). LARS's trust ratio largely hides that scale for the weights, not for the biases and BN
parameters, which get plain SGD: the paper's bias rate was thus tuned, on its 32 GPUs, with a gradient
1/32 of the global batch's (our reading of the official code, not a figure the paper gives); this file
keeps the paper's rate on the exact gradient.
Cost: every rank computes the full (D, D) C from N_global rows (N_global D^2 multiply-adds), where the
official code computes its N_local rows and all-reduces a (D, D) matrix; the all-gather moves 2 N_global D
numbers instead.

Optimizer: LARS with the learning rate 0.2 for the weights and 0.0048 for the biases and BN parameters,
both times batch/256, the latter excluded from weight decay and LARS adaptation (Sec. 2.2). The harness's
LARS has the official update (trust ratio eta ||w|| / ||g + wd w||, eta = 0.001, momentum 0.9) and its
default parameter groups already exempt parameters with ndim <= 1; ``param_groups()`` adds the biases'
own rate as ``lr_scale = bias_lr / base_lr`` on that group, so the harness's schedule gives each group
the paper's rate.

Deviations:
- the learning rate: linear warm-up, then the harness's cosine decays it to 0; the paper decays it by a
  factor of 1000 (Sec. 2.2; official ``adjust_learning_rate``: to 1/1000 of the peak);
- the standardisation of the embeddings is a function, not an ``nn.BatchNorm1d(affine=False)`` module, so
  that it is computed over the gathered global batch (a BN module sees this rank's rows unless it is a
  SyncBatchNorm, which needs CUDA) and is not touched by code that swaps BN layers; the official module's
  running statistics are never read (the loss exists only in training), so no buffer is kept;
- C and the loss are computed in float32 with autocast off, also under AMP (the official code computes
  them under fp16 autocast): the invariance term squares 1 - C_ii, small differences of values near 1;
- the views: crops are resized with antialiased bilinear interpolation (the harness's batched crop) where
  the official loader uses bicubic; the Gaussian blur needs a kernel size in torchvision, 10% of the side,
  odd (23 px at 224), where the official loader blurs with PIL by radius sigma; it is dropped below 64 px,
  as SimCLR does for CIFAR-10 (its App. B.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    lambd: float = 0.0051
    """lambda, the weight of the redundancy-reduction term in Eq. 1: the official ``--lambd`` default; the
    paper's search found 5e-3 best (Sec. 2.2) and the method insensitive from 0.002 to 0.02 (Fig. 5)."""
    proj_hidden_dim: int = 8192
    """Width of the projector's hidden layers: three linear layers of 8192 units (Sec. 2.1, Architecture;
    official ``--projector 8192-8192-8192``)."""
    proj_dim: int = 8192
    """D, the dimension of the embeddings fed to the loss (Sec. 2.1; accuracy still rises at 16384, Fig. 4)."""
    proj_layers: int = 3
    """Linear layers in the projector, BN + ReLU after all but the last (Sec. 2.1; Sec. 4: performance
    saturates at 3 layers)."""
    bn_eps: float = 1e-5
    """eps added to the batch variance when the embeddings are standardised: not stated in the paper (Eq. 2
    has none); the default of the official code's ``nn.BatchNorm1d``. It keeps a constant dimension at 0."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop: BYOL's parameters (Sec. 2.2: "the same augmentation
    parameters as BYOL"; official ``RandomResizedCrop`` default scale)."""
    optimizer: str = "lars"
    """LARS (Sec. 2.2, following BYOL's protocol)."""
    base_lr: float = 0.2
    """Learning rate of the weights per 256 images: lr = 0.2 x batch/256 (Sec. 2.2; official
    ``--learning-rate-weights``)."""
    bias_lr: float = 0.0048
    """Learning rate of the biases and BN parameters per 256 images (Sec. 2.2; official
    ``--learning-rate-biases``); applied as ``lr_scale = bias_lr / base_lr`` on their parameter group."""
    weight_decay: float = 1.5e-6
    """Sec. 2.2 (biases and BN parameters excluded); the official ``--weight-decay`` default is 1e-6."""
    momentum: float = 0.9
    """LARS momentum: not stated in the paper (it follows BYOL's protocol); the official LARS default."""
    warmup_epochs: int = 10
    """Linear warm-up of 10 epochs, then cosine decay (Sec. 2.2)."""
    epochs: int = 1000
    """Sec. 2.2 (300 in the ablations, Sec. 4)."""
    batch_size: int = 2048
    """Sec. 2.2 (the method is nearly as good at 256, Fig. 2)."""
    sync_batchnorm: bool = True
    """The official code converts every BN to SyncBatchNorm: the projector's BN statistics are global."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# k-NN figures are from `selfsup train barlow-twins --set ...` runs, random init 0.839):
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets);
# - projector 1024-1024-1024 on the small CNN's 256-d features: 4x the backbone width, as 8192 is for the
#   ResNet-50's 2048; D = 16 N at batch 64 (the paper's widest, 16384, is 8 N at 2048). 2048-2048-2048
#   gives 0.886 for 0.881 (run 4 vs 3) at 1.6x the time and a lower linear probe (0.981 for 0.992);
# - base_lr 4.0 (lr 1.0 at batch 64), warmup_epochs 1: with LARS's trust ratio (eta 0.001) the paper's 0.2
#   moves the weights by ~5e-4 of their norm a step, and its 10 warm-up epochs are half of the 15 here:
#   k-NN 0.792 (below random init; the diagonal of C only reaches 0.52). base_lr 2.0 gives 0.864, 4.0 0.881;
# - bias_lr stays the paper's 0.0048 per 256 (0.0012 at batch 64), lambd the paper's 0.0051.
PRESETS = {"small": dict(min_scale=0.4, proj_hidden_dim=1024, proj_dim=1024, base_lr=4.0, warmup_epochs=1)}


# --- augmentations (Sec. 2.2: BYOL's two asymmetric distributions) -------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """The two views (Sec. 2.2, BYOL's parameters; official ``Transform``): crop, flip, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale (p=0.2), then blur with p=1.0 and no solarisation for the
    first view, blur with p=0.1 and solarisation with p=0.2 for the second. Each view is one v2 pipeline; it
    takes a PIL image or a uint8 tensor."""

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
        steps += [v2.RandomSolarize(threshold=128, p=solarize_p)]  # on uint8 values, as PIL's solarize
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    return [make(1.0, 0.0), make(0.1, 0.2)]


# --- heads ----------------------------------------------------------------------------------------


def projector(in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Module:
    """``layers`` linear layers without bias, BN + ReLU after each but the last (Sec. 2.1; the official
    projector's layers have no bias, the BN after them has one)."""
    sizes = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    blocks: list[nn.Module] = []
    for i in range(layers - 1):
        blocks += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
    blocks.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
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


def batch_standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Each dimension of z (N, D) to mean 0 and variance 1 over the batch, with the biased variance and eps
    inside the square root: what ``nn.BatchNorm1d(D, affine=False)`` does in training mode."""
    mean = z.mean(dim=0)  # (D,)
    var = z.var(dim=0, correction=0)  # (D,), biased
    return (z - mean) / torch.sqrt(var + eps)  # (N, D)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """C (D, D) of Eq. 2 over the global batch. z1, z2: (N, D) this rank's embeddings of the two views;
    under torch.distributed they are gathered, with gradient, from every rank."""
    all1, _ = gather_with_grad(z1)  # (N_global, D)
    all2, _ = gather_with_grad(z2)
    n = all1.shape[0]
    return batch_standardise(all1, eps).T @ batch_standardise(all2, eps) / n  # (D, D)


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The D(D - 1) off-diagonal entries of a square matrix (D, D), flattened. Past the first entry, the
    flattened matrix splits into D - 1 rows of D + 1 entries, each ending on a diagonal entry."""
    d = c.shape[0]
    return c.flatten()[1:].view(d - 1, d + 1)[:, :-1].flatten()


def loss_terms(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(invariance term sum_i (1 - C_ii)^2, redundancy-reduction term sum_{i != j} C_ij^2) of Eq. 1."""
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag, off_diag


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> torch.Tensor:
    """L_BT (Eq. 1) of the embeddings z1, z2 (N, D) of the two views, over the global batch."""
    on_diag, off_diag = loss_terms(cross_correlation(z1, z2, eps))
    return on_diag + lambd * off_diag  # Eq. 1


# --- model ----------------------------------------------------------------------------------------


class BarlowTwins(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        z1 = self.projector(self.backbone(x1))  # (N, D); each view is its own BN batch, as officially
        z2 = self.projector(self.backbone(x2))
        with torch.autocast(x1.device.type, enabled=False):  # C and the loss in float32, also under AMP
            c = cross_correlation(z1.float(), z2.float(), self.cfg.bn_eps)  # (D, D), global batch
            on_diag, off_diag = loss_terms(c)
            loss = on_diag + self.cfg.lambd * off_diag  # Eq. 1
        with torch.no_grad():
            d = c.shape[0]
            diag_mean = torch.diagonal(c).mean()  # 1 when the views agree in every dimension
            off_rms = (off_diag / (d * (d - 1))).sqrt()  # about N^-1/2 for independent dimensions
        return {"loss": loss, "on_diag": on_diag.detach(), "off_diag": off_diag.detach(), "diag_mean": diag_mean,
                "off_rms": off_rms}

    def param_groups(self) -> list[dict]:
        """Weights: weight decay and LARS adaptation at the schedule's rate; biases and BN parameters (ndim
        <= 1): neither, at bias_lr / base_lr times that rate (Sec. 2.2; official ``param_biases``)."""
        weights = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        biases = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [
            {"params": weights, "weight_decay": self.cfg.weight_decay},
            {"params": biases, "weight_decay": 0.0, "lars": False, "lr_scale": self.cfg.bias_lr / self.cfg.base_lr},
        ]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's representation, before the projector: "the representations are used for downstream
        tasks" (Sec. 2.1); the official linear evaluation uses the ResNet-50 features."""
        return self.backbone(x)


MODEL = BarlowTwins


if __name__ == "__main__":
    z = torch.randn(256, 64)
    print("random:", barlow_twins_loss(z, torch.randn(256, 64), 0.0051).item(),
          "same views:", barlow_twins_loss(z, z, 0.0051).item(),
          "collapsed:", barlow_twins_loss(torch.ones(256, 64), torch.ones(256, 64), 0.0051).item())
