"""Shuffled-DBN — Hua, Wang, Xue, Ren, Wang, Zhao. "On Feature Decorrelation in Self-Supervised Learning".
ICCV 2021, arXiv:2105.00470. Catalog id: ``hua-2021-decorrelation``. Official code:
https://github.com/PatrickHua/FeatureDecorrelationSSL (``models/covnorm.py``,
``models/utils/shuffled_group_whitening.py``, ``configs/exp_small_800ep/cifar10/covnorm.yaml``).

The paper's concise framework: one encoder f (backbone and projector) for both views, no predictor, no
stop-gradient, no negatives, and the squared L2 distance between the two views' outputs. What keeps it
from collapsing is the last layer of the projector, a decorrelated batch normalisation (DBN, ZCA
whitening over the batch) applied to groups of features that are drawn anew at random on every call
(Shuffled-DBN). For one view's projections Z (N, D):

    P = a random permutation of the D features, split into G groups g_1..g_G of ~D/G features,
    for each group g:  X_g = Z[:, g] - mean_0 Z[:, g]                          (N, |g|)
                       Sigma_g = X_g^T X_g / N                                  (|g|, |g|), biased
                       Sigma_g = U diag(lambda) U^T,  W_g = U diag(lambda + eps)^{-1/2} U^T   (ZCA)
                       Y[:, g] = X_g W_g                                        (identity covariance)
    then Y's columns are put back in the original feature order (the permutation undone).

Each view draws its own permutation (the official model calls the layer once per view). The loss is

    L = 1/N sum_n || y1_n - y2_n ||^2   (official ``loss_fn='l22'``: ``(z1 - z2).norm(dim=1).pow(2).mean()``).

With eps = 0 every group of Y has identity covariance, so L = 2 |P| - 2 sum_k c_kk with c = Y1^T Y2 / N:
between 0 (the views agree, image by image and feature by feature) and 4D. Groups: G = ceil(2D / N) by
default, so that each group holds about N/2 features (the official automatic rule; the CIFAR configs' 16
groups at D = 512 and N = 64 are that value): enough samples per group for a well-conditioned covariance,
while the shuffling decorrelates features of different groups across steps (a feature pair shares a group
with probability ~1/G, and two views grouped differently agree only if the groups' cross-correlations
vanish too).

Collapse: no negatives, no asymmetry. Whitening fixes each group's covariance to the identity whatever the
encoder outputs, so neither a constant output (complete collapse, the paper's first pattern) nor an
output in a low-dimensional subspace (dimensional collapse, the second) survives it: the residual
variation of a dead direction is scaled back to unit variance, and residual noise that the two views do
not share scores 2 per dead direction, the value of unrelated features. The minimum 0 needs D whitened
directions that agree across views, i.e. a full-rank invariant embedding.

Distributed: the whitening statistics are of the GLOBAL batch. Each rank all-gathers both views'
projections with gradient (``gather_with_grad``) and whitens and scores the whole batch; the automatic
group count comes from the global batch size, and each view's permutation is drawn on rank 0 and
broadcast (the harness seeds each rank differently). Every rank computes the same global loss; the
gather's backward sums the world_size identical gradients of each rank's rows and DDP averages over
ranks, which cancel, so loss and gradients equal one process on the concatenated batch.

Deviations:
- global statistics: the official ``main.py`` wraps the model in ``DataParallel``, so each GPU whitens
  (and batch-normalises) its own share of the batch; here the whitening sees the whole batch, which is
  what one GPU with the whole batch computes;
- the projector's last Linear has no bias: the whitening subtracts the batch mean, so the bias cannot change
  the loss (its gradient is float noise);
- a feature count that G does not divide is split into G groups of nearly equal size (the official layer
  requires G to divide D);
- the whitening runs in float64 with autocast off (official: float32 ``symeig``), and the backward of
  Sigma^{-1/2} is written in closed form (Daleckii-Krein): the divided difference of lambda^{-1/2} is
  -1 / (s_i s_j (s_i + s_j)) with s = sqrt(lambda + eps), which stays finite when eigenvalues coincide,
  where the eigenvector gradient that autograd of ``eigh`` uses divides by lambda_i - lambda_j. Same
  gradient, without the cancellation. ``whiten_eps`` (official: none, i.e. 0) is offered for
  near-singular groups; eigenvalues are clamped at 0 against rounding;
- optimizer: the small preset trains with AdamW (see PRESETS); the defaults are the official SGD;
- only the paper's main objective (``l22``) is included, not the objectives of its ablation (l2, cosine,
  l33, l44), nor the variants that put Shuffled-DBN into SimCLR, BYOL or SimSiam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 1024
    """Hidden width of the projector (official CIFAR configs, ``projector.hidden_dim: 1024``, 2 layers)."""
    proj_dim: int = 512
    """D, the projector's output, whitened in groups (official ``projector.out_dim: 512``)."""
    num_groups: int = 0
    """G, groups of the shuffled whitening; 0: automatic, ceil(2 D / N) for the global batch N, ~N/2 features
    per group (official ``num_groups: null``, the ImageNet config); the CIFAR configs set 16, the automatic
    value at D 512 and batch 64."""
    shuffle: bool = True
    """Draw the grouping anew on every call (Shuffled-DBN); False: fixed consecutive groups, the plain group
    DBN of the paper's comparison (official ``shuffle``)."""
    whiten_eps: float = 0.0
    """Added to the eigenvalues before the inverse square root: none in the official layer (``S.rsqrt()``)."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official ``SimSiamTransform``: scale (0.2, 1))."""
    optimizer: str = "sgd"
    """SGD (official ``optimizer.name: sgd``)."""
    base_lr: float = 0.02
    """Per 256 images (official ``lr_scheduler.base_lr: 0.02``, scaled by batch / 256 in ``LR_Scheduler``)."""
    weight_decay: float = 1e-3
    """Official ``optimizer.weight_decay: 0.001`` (its comment calls 0.0025 optimal)."""
    momentum: float = 0.9
    """Official ``optimizer.momentum``."""
    warmup_epochs: int = 5
    """Linear warm-up from 0, then cosine to 0 (official ``lr_scheduler``)."""
    epochs: int = 800
    """Official ``configs/exp_small_800ep`` (a comment there records 89.50 for CIFAR-10); 200 in
    ``configs/exp_small_200ep``."""
    batch_size: int = 64
    """N (official CIFAR configs ``batch_size: 64``; the ImageNet config uses 256)."""
    sync_batchnorm: bool = True
    """The official code trains on one machine with DataParallel; SyncBatchNorm gives the projector's BN the
    whole batch under torchrun, as the whitening has."""


# Small-scale preset for CPU runs on the embedded digits (15 epochs at batch 64, small_cnn, random init k-NN
# 0.839); figures from `selfsup train hua-2021-decorrelation --set ...`:
# - proj_hidden_dim 512, proj_dim 64: two automatic groups of 32 features for the batch of 64 (the official
#   ratio, N/2 features per group);
# - optimizer adamw, base_lr 0.04 (lr 1e-2 at batch 64), weight_decay 1e-6: the rates that train W-MSE's
#   whitened loss here in 330 steps;
# - warmup_epochs 1: 5 would be a third of the run; min_scale 0.4: 20% crops of an 8x8 digit are a blob.
# Runs (loss: 2 D = 128 for unrelated views):
# - this preset: k-NN 0.906, linear 0.983, RankMe 34.0; loss 114 -> 54, mean |corr| 0.37 -> 0.22 (254 s);
# - optimizer sgd, base_lr 0.4, weight_decay 1e-4: k-NN 0.803 (below random init), loss 118 -> 73, RankMe 10.1;
# - base_lr 0.08: k-NN 0.889, linear 0.997, loss 117 -> 54;
# - base_lr 0.02: k-NN 0.867, linear 0.989, RankMe 37.3.
PRESETS = {"small": dict(proj_hidden_dim=512, proj_dim=64, optimizer="adamw", base_lr=0.04, weight_decay=1e-6,
                         warmup_epochs=1, min_scale=0.4)}


# --- augmentations (official augmentations/simsiam_aug.py) ---------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from one distribution (official ``SimSiamTransform``): crop (scale min_scale..1), flip,
    colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale (p=0.2), and a Gaussian blur (p=0.5, sigma
    0.1..2) only above 32 px, as the official recipe. Each view takes a PIL image or a uint8 tensor."""
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if image_size > 32:
        steps.append(v2.RandomApply([v2.GaussianBlur(image_size // 20 * 2 + 1, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps) for _ in range(2)]


# --- heads ----------------------------------------------------------------------------------------


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear - BN - ReLU - Linear (official ``projection_MLP`` with 2 layers); the Shuffled-DBN that ends
    the official projector is applied in the loss, over the global batch. The last Linear has no bias,
    which the whitening's centring removes (see Deviations)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim, bias=False)
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


class _InverseSqrt(torch.autograd.Function):
    """Sigma^{-1/2} = U diag(lambda + eps)^{-1/2} U^T of symmetric PSD matrices (..., k, k), with the
    closed-form backward: dL/dSigma = U (K o U^T sym(G) U) U^T, K_ij = -1 / (s_i s_j (s_i + s_j)),
    s = sqrt(lambda + eps) (the divided differences of lambda^{-1/2}, finite for equal eigenvalues)."""

    @staticmethod
    def forward(ctx, cov: torch.Tensor, eps: float) -> torch.Tensor:
        lam, u = torch.linalg.eigh(cov)  # (..., k), (..., k, k)
        s = (lam.clamp_min(0) + eps).sqrt()  # (..., k); clamp: rounding can leave tiny negative eigenvalues
        ctx.save_for_backward(u, s)
        return (u / s.unsqueeze(-2)) @ u.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        u, s = ctx.saved_tensors
        g = u.mT @ ((grad + grad.mT) / 2) @ u  # (..., k, k) in the eigenbasis
        k = -1 / (s.unsqueeze(-1) * s.unsqueeze(-2) * (s.unsqueeze(-1) + s.unsqueeze(-2)))  # (..., k, k)
        return u @ (k * g) @ u.mT, None


def zca_whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """ZCA whitening over the rows of each (N, k) set: (..., N, k) -> (..., N, k) with identity covariance
    (biased, / N, as the official layer), gradient through the mean and the covariance (DBN)."""
    xc = x - x.mean(dim=-2, keepdim=True)  # (..., N, k)
    cov = xc.mT @ xc / x.shape[-2]  # (..., k, k)
    return xc @ _InverseSqrt.apply(cov, eps)  # (..., N, k); W symmetric


def auto_groups(num_features: int, batch_size: int) -> int:
    """ceil(2 D / N) groups, so that each holds about N/2 features (official automatic rule), at most D."""
    return min(num_features, math.ceil(2 * num_features / batch_size))


def group_whiten(z: torch.Tensor, perm: torch.Tensor, num_groups: int, eps: float = 0.0) -> torch.Tensor:
    """Shuffled group whitening of z (N, D): the features in the order ``perm`` split into ``num_groups``
    groups of nearly equal size (``perm.tensor_split(num_groups)``: the first D mod G one larger), each
    ZCA-whitened on its own, then put back in their original order."""
    n, d = z.shape
    size, larger = divmod(d, num_groups)
    zp = z[:, perm]  # (N, D), permuted features
    cut = larger * (size + 1)
    parts = []
    for block, k in ((zp[:, :cut], size + 1), (zp[:, cut:], size)):  # groups of each size, whitened batched
        if block.shape[1]:
            groups = block.unflatten(1, (-1, k)).transpose(0, 1)  # (G', N, k)
            parts.append(zca_whiten(groups, eps).transpose(0, 1).flatten(1))  # (N, G' k)
    return torch.cat(parts, dim=1)[:, perm.argsort()]  # (N, D), the permutation undone


def shuffled_dbn(z1: torch.Tensor, z2: torch.Tensor, perm1: torch.Tensor, perm2: torch.Tensor, num_groups: int,
                 eps: float = 0.0) -> torch.Tensor:
    """The loss of projections z1, z2 (N, D) of the two views, each view whitened with its own grouping:
    1/N sum_n || y1_n - y2_n ||^2 (official ``l22``)."""
    n, d = z1.shape
    if eps == 0 and math.ceil(d / num_groups) >= n:
        raise ValueError(f"Shuffled-DBN: groups of {math.ceil(d / num_groups)} features cannot be whitened from {n} "
                         "samples (the centred covariance has rank < N): raise num_groups (0 = automatic) or the "
                         "batch, lower proj_dim, or set whiten_eps > 0")
    y1 = group_whiten(z1, perm1, num_groups, eps)  # (N, D)
    y2 = group_whiten(z2, perm2, num_groups, eps)
    return (y1 - y2).pow(2).sum(dim=1).mean()


def shared_feature_permutation(d: int, device: torch.device, shuffle: bool = True) -> torch.Tensor:
    """A random order of the d features, the same on every rank (rank 0's, broadcast); the identity when
    ``shuffle`` is off."""
    if not shuffle:
        return torch.arange(d, device=device)
    perm = torch.randperm(d, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(perm, src=0)
    return perm


def mean_abs_correlation(z: torch.Tensor) -> torch.Tensor:
    """Mean |off-diagonal| of the features' correlation matrix (the paper's correlation strength)."""
    c = torch.corrcoef(z.T)  # (D, D)
    d = c.shape[0]
    return (c.abs().sum() - c.diagonal().abs().sum()) / (d * (d - 1))


def shuffled_dbn_loss(z1: torch.Tensor, z2: torch.Tensor, num_groups: int = 0, eps: float = 0.0,
                      shuffle: bool = True) -> dict[str, torch.Tensor]:
    """{"loss", "corr"} of this rank's projections z1, z2 (n, D) over the GLOBAL batch, the whitening in
    float64 with autocast off, returned in float32 (float64 for float64 inputs); the same on every rank."""
    out_dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, _ = gather_with_grad(z1)  # (N, D)
        b, _ = gather_with_grad(z2)
        n, d = a.shape
        groups = num_groups or auto_groups(d, n)
        perm1 = shared_feature_permutation(d, a.device, shuffle)  # one grouping per view, as officially
        perm2 = shared_feature_permutation(d, a.device, shuffle)
        loss = shuffled_dbn(a.double(), b.double(), perm1, perm2, groups, eps)
        with torch.no_grad():
            corr = mean_abs_correlation(a.double())  # before whitening
    return {"loss": loss.to(out_dtype), "corr": corr.to(out_dtype)}


# --- model ----------------------------------------------------------------------------------------


class ShuffledDBN(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.num_groups < 0 or cfg.num_groups > cfg.proj_dim:
            raise ValueError(f"Shuffled-DBN: num_groups={cfg.num_groups} must be 0 (automatic) or 1..proj_dim={cfg.proj_dim}")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (n, C, H, W) each
        z1 = self.projector(self.backbone(x1))  # (n, D); each view is its own BN batch, as officially
        z2 = self.projector(self.backbone(x2))
        out = shuffled_dbn_loss(z1, z2, self.cfg.num_groups, self.cfg.whiten_eps, self.cfg.shuffle)
        with torch.no_grad():
            out["pos_sim"] = F.cosine_similarity(z1, z2, dim=-1).mean()  # before whitening
        return out

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's representation, before the projector (the official ``linear_eval.py`` trains its
        classifier on ``model.backbone``)."""
        return self.backbone(x)


MODEL = ShuffledDBN


if __name__ == "__main__":
    z = torch.randn(256, 64)
    print("random:", shuffled_dbn_loss(z, torch.randn(256, 64))["loss"].item(),
          "same embedding:", shuffled_dbn_loss(z, z)["loss"].item(),
          "same, not shuffled:", shuffled_dbn_loss(z, z, shuffle=False)["loss"].item())
