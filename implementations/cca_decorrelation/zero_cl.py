"""Zero-CL — Zhang, Zhu, Yan, Zhao, Yang. "Zero-CL: Instance and Feature decorrelation for negative-free
symmetric contrastive learning". ICLR 2022 (OpenReview ``RAW9tCdVxLj``; no arXiv version), arXiv: none.
Catalog id: ``zero-cl``. Official code: the authors' repository linked from the OpenReview page (README
"ZeroCL: instance and feature correlation ..."; its ImageNet ``main.py`` with ``ins_loss``, ``fea_loss``,
``standardization`` and ``WhitenTran``, and a CIFAR ``methods/`` folder in the W-MSE code base).

Source of the equations: the official ``main.py`` (the script that trains both variants, ``--mode ins`` and
``--mode fea``); the paper's own text could not be read here, so the notation below is ours and the way the
two terms are combined is NOT verified against the paper (see Deviations).

Two views of N images give projections Z^A, Z^B (N, d). Whitening of a matrix X (m, k), rows as samples
(official ``WhitenTran.zca_forward``): with the uncentred second moment and its eigen-decomposition

    C = X^T X / m = U diag(s) U^T,   W = U diag((s + eps)^{-1/2}) U^T   (ZCA, eps = 0.01),
    zca(X) = X sg(W),

where sg is stop-gradient: the official code ``.detach()``es W, so the gradient flows through X only, not
through the eigen-decomposition. zca(X)^T zca(X) / m = U diag(s / (s + eps)) U^T, the identity for eps = 0.

Feature-wise (FCL, ``fea_loss``): each feature standardised over the batch,
    S = (Z - mean_0 Z) / (std_0 Z + 1e-4)   (unbiased std, per column),   Zf = zca(S)  (d, d whitening),
    c^f = Zf^A^T Zf^B / N   (d, d),   L_fea = sum_k (c^f_kk - 1)^2.
Instance-wise (ICL, ``ins_loss``): each instance standardised over its features,
    S = (Z - mean_1 Z) / (std_1 Z + 1e-4)   (per row),   Zi = zca(S^T)^T = sg(W_N) S  (N, N whitening
    of the Gram matrix S S^T / d),
    c^i = Zi^A Zi^B^T / d   (N, N),   L_ins = sum_n (c^i_nn - 1)^2.
Zero-CL:
    L = w_ins L_ins + w_fea L_fea   (w_ins = w_fea = 1: our reading, unverified).
Only the diagonals are targeted: the off-diagonal entries of each view's own correlation are already ~0
by the whitening, which is what replaces Barlow Twins' redundancy term and SimCLR's negatives.

Collapse: no negatives, no predictor, no stop-gradient on a branch. A constant output standardises to 0
(the 1e-4 in the denominator), both correlations are 0 and the loss is N + d, what two unrelated views
score (their diagonal entries are ~0), far above matched views. Whitening
spreads every view's batch over all directions of its span with unit variance (feature-wise) and makes
the instances of a view mutually orthogonal (instance-wise), so the diagonal targets can only be met by
matching the two views image by image and feature by feature, not by shrinking onto a few directions.

Distributed: every statistic (standardisation, whitening matrices, correlations) is of the GLOBAL batch.
Each rank all-gathers both views' projections with gradient (``gather_with_grad``) and computes the loss
of the whole batch, the same value on every rank. The gather's backward sums the world_size identical
gradients of each rank's rows and DDP averages over ranks; the two cancel, so loss and gradients equal
one process on the concatenated batch. The instance-wise whitening is an (N_global, N_global)
eigen-decomposition on every rank, in float64: N_global^3 operations, which at the paper's batch of 256
is small beside the encoder.

Deviations:
- global statistics: the official code standardises and whitens each GPU's batch on its own, then
  all-reduces c (a plain all-reduce, whose backward is the identity, so each rank's rows get 1/world_size
  of the gradient of the summed loss; for ICL it sums the (n, n) matrices of different images across
  ranks). Here both are of the global batch, which is what one GPU with the whole batch computes;
- the combination of ICL and FCL: the official script trains one of them (``--mode ins`` or ``fea``;
  ``fea`` for ImageNet in the README), so the default is FCL alone (``ins_weight = 0``); the paper's rule
  for a combined loss could not be read, and the sum that the small preset trains is our choice, not the
  paper's;
- eigh instead of SVD for the symmetric PSD moment (same U and s; s clamped at 0 against rounding);
- the standardisation, whitening and loss run in float64 with autocast off (official: float32);
- the harness's LARS has eta = 0.001 where the official LARS uses 0.02, and its cosine decays to 0 where
  the official one stops at 1/1000 of the peak; the crop interpolates bilinearly (official bicubic); the
  blur needs a kernel size (10% of the side, odd) and is dropped below 64 px, as Barlow Twins here;
- the CIFAR variant of the official ``WhitenTran`` (shrinkage 0.9 C + 0.1 I, eps 1e-5, unbiased moment,
  c divided by d for ICL) is not included: this file follows the ImageNet ``main.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    ins_weight: float = 0.0
    """Weight of the instance-wise term L_ins: 0, the official README's ImageNet ``--mode fea``; 1 with
    ``fea_weight = 0`` is ``--mode ins``; both at 1 is a sum the paper's text could not confirm."""
    fea_weight: float = 1.0
    """Weight of the feature-wise term L_fea: as ``ins_weight``; 0 gives the official ``--mode ins``."""
    whiten_eps: float = 0.01
    """eps added to the eigenvalues before the inverse square root (official ``WhitenTran(eps=0.01)``)."""
    std_eps: float = 1e-4
    """Added to the standard deviation in the standardisation (official ``standardization``)."""
    proj_hidden_dim: int = 8192
    """Width of the projector's hidden layers (official ``--projector 8192-8192-8192``)."""
    proj_dim: int = 8192
    """d, the dimension of the projections fed to the loss (official ``--projector``, last entry)."""
    proj_layers: int = 3
    """Linear layers in the projector, no bias, BN + ReLU after all but the last (official ``ZeroCL``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official ``Transform``: torchvision's default)."""
    optimizer: str = "lars"
    """LARS (official ``main.py``)."""
    base_lr: float = 0.3
    """Learning rate of the weights per 256 images (official ``--learning-rate-weights`` 0.3 x batch/256)."""
    bias_lr: float = 0.0048
    """Biases and BN parameters, per 256 images (official ``--learning-rate-biases``), as ``lr_scale``."""
    weight_decay: float = 1e-6
    """Official ``--weight-decay`` (biases and BN parameters excluded)."""
    momentum: float = 0.9
    """Official LARS default."""
    warmup_epochs: int = 10
    """Official ``adjust_learning_rate``: 10 epochs of linear warm-up, then cosine."""
    epochs: int = 400
    """Official ``--epochs`` default and the README's ImageNet commands (1000 for CIFAR in the README)."""
    batch_size: int = 256
    """Official ``--batch-size`` default."""
    sync_batchnorm: bool = True
    """The official code converts every BN to SyncBatchNorm."""


# Small-scale preset for CPU runs on the embedded digits (15 epochs at batch 64, small_cnn, random init k-NN
# 0.839); figures from `selfsup train zero-cl --set ...`:
# - proj_hidden_dim 512, proj_dim 32: d < N = 64, so that the feature-wise moment is full rank (the paper's
#   8192 > 256 is not: most whitened directions are then empty); a 32 x 32 and a 64 x 64 eigh per view.
#   This preset: k-NN 0.883, linear 0.981 (random init 0.839, 0.986); proj_dim 128 (d > N, the paper's
#   regime): k-NN 0.858, linear 0.983;
# - optimizer adamw, base_lr 0.04 (lr 1e-2 at batch 64), weight_decay 1e-6: the harness's LARS (eta 0.001)
#   at the official 0.3 moves the weights by ~1e-4 of their norm a step, too little for 330 steps;
# - warmup_epochs 1: 10 would be two thirds of the run; min_scale 0.4: 8% crops of an 8x8 digit are a blob.
# - ins_weight 1: both terms, summed (not the official FCL-only default; the runs above trained the sum).
PRESETS = {"small": dict(proj_hidden_dim=512, proj_dim=32, optimizer="adamw", base_lr=0.04, warmup_epochs=1,
                         min_scale=0.4, ins_weight=1.0)}


# --- augmentations (official Transform: BYOL's two asymmetric distributions) ---------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """The two views (official ``Transform`` / ``transform_prime``): crop, flip, colour jitter (0.4, 0.4,
    0.2, 0.1) with p=0.8, grayscale (p=0.2), then blur with p=1.0 and no solarisation for the first view,
    blur with p=0.1 and solarisation with p=0.2 for the second. Each takes a PIL image or a uint8 tensor."""

    def make(blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:
            kernel = int(0.1 * image_size) // 2 * 2 + 1
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        steps += [v2.RandomSolarize(threshold=128, p=solarize_p)]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    return [make(1.0, 0.0), make(0.1, 0.2)]


# --- heads ----------------------------------------------------------------------------------------


def projector(in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Module:
    """``layers`` linear layers without bias, BN + ReLU after each but the last (official ``ZeroCL``)."""
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


def standardise(z: torch.Tensor, dim: int, eps: float = 1e-4) -> torch.Tensor:
    """(z - mean) / (unbiased std + eps) along ``dim`` (official ``standardization``)."""
    return (z - z.mean(dim=dim, keepdim=True)) / (z.std(dim=dim, keepdim=True) + eps)


def whitening_matrix(x: torch.Tensor, eps: float) -> torch.Tensor:
    """W = U diag((s + eps)^{-1/2}) U^T (k, k) of the uncentred moment x^T x / m = U diag(s) U^T of x (m, k),
    without gradient (official ``zca_forward`` detaches it)."""
    with torch.no_grad():
        s, u = torch.linalg.eigh(x.mT @ x / x.shape[0])  # (k,), (k, k)
        return (u * (s.clamp_min(0) + eps).rsqrt()) @ u.mT


def zca(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x (m, k) -> x W (m, k): ZCA whitening of the rows, gradient through x only."""
    return x @ whitening_matrix(x, eps)


def feature_loss(z1: torch.Tensor, z2: torch.Tensor, whiten_eps: float = 0.01, std_eps: float = 1e-4) -> torch.Tensor:
    """L_fea of projections z1, z2 (N, d): features standardised and whitened over the batch, then
    sum_k (c_kk - 1)^2 of their cross-correlation c = Zf1^T Zf2 / N (d, d) (official ``fea_loss``)."""
    f1 = zca(standardise(z1, 0, std_eps), whiten_eps)  # (N, d)
    f2 = zca(standardise(z2, 0, std_eps), whiten_eps)
    c = f1.T @ f2 / z1.shape[0]  # (d, d)
    return (torch.diagonal(c) - 1).pow(2).sum()


def instance_loss(z1: torch.Tensor, z2: torch.Tensor, whiten_eps: float = 0.01, std_eps: float = 1e-4) -> torch.Tensor:
    """L_ins of projections z1, z2 (N, d): instances standardised over their features and whitened over the
    (N, N) Gram matrix, then sum_n (c_nn - 1)^2 of c = Zi1 Zi2^T / d (N, N) (official ``ins_loss``)."""
    i1 = zca(standardise(z1, 1, std_eps).T, whiten_eps).T  # (N, d): W_N S
    i2 = zca(standardise(z2, 1, std_eps).T, whiten_eps).T
    c = i1 @ i2.T / z1.shape[1]  # (N, N)
    return (torch.diagonal(c) - 1).pow(2).sum()


def zero_cl_loss(z1: torch.Tensor, z2: torch.Tensor, ins_weight: float = 1.0, fea_weight: float = 1.0,
                 whiten_eps: float = 0.01, std_eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """{"loss", "ins", "fea"} of this rank's projections z1, z2 (n, d) over the GLOBAL batch, in float64 with
    autocast off, returned in float32 (or float64 for float64 inputs); the same value on every rank."""
    out_dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, _ = gather_with_grad(z1)  # (N, d)
        b, _ = gather_with_grad(z2)
        a, b = a.double(), b.double()
        ins = instance_loss(a, b, whiten_eps, std_eps) if ins_weight else a.new_zeros(())
        fea = feature_loss(a, b, whiten_eps, std_eps) if fea_weight else a.new_zeros(())
        loss = ins_weight * ins + fea_weight * fea
    return {"loss": loss.to(out_dtype), "ins": ins.detach().to(out_dtype), "fea": fea.detach().to(out_dtype)}


# --- model ----------------------------------------------------------------------------------------


class ZeroCL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if not (cfg.ins_weight or cfg.fea_weight):
            raise ValueError("Zero-CL: ins_weight and fea_weight are both 0, the loss would be empty")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (n, C, H, W) each
        z1 = self.projector(self.backbone(x1))  # (n, d); each view is its own BN batch, as officially
        z2 = self.projector(self.backbone(x2))
        out = zero_cl_loss(z1, z2, self.cfg.ins_weight, self.cfg.fea_weight, self.cfg.whiten_eps, self.cfg.std_eps)
        return out

    def param_groups(self) -> list[dict]:
        """Weights: weight decay and LARS adaptation; biases and BN parameters (ndim <= 1): neither, at
        bias_lr / base_lr times the schedule's rate (official ``param_biases``)."""
        weights = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        biases = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [
            {"params": weights, "weight_decay": self.cfg.weight_decay},
            {"params": biases, "weight_decay": 0.0, "lars": False, "lr_scale": self.cfg.bias_lr / self.cfg.base_lr},
        ]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's representation, before the projector (the official code saves and evaluates the
        ResNet's features)."""
        return self.backbone(x)


MODEL = ZeroCL


if __name__ == "__main__":
    z = torch.randn(256, 64)
    print("random:", zero_cl_loss(z, torch.randn(256, 64))["loss"].item(),
          "same views:", zero_cl_loss(z, z)["loss"].item(),
          "collapsed:", zero_cl_loss(torch.ones(256, 64), torch.ones(256, 64))["loss"].item())
