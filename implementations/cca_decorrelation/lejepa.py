"""LeJEPA — Balestriero, LeCun. "LeJEPA: Provable and Scalable Self-Supervised Learning Without the
Heuristics". arXiv preprint 2025, arXiv:2511.08544. Catalog id: ``lejepa``. Official code:
https://github.com/rbalestr-lab/lejepa (``lejepa/univariate/epps_pulley.py``,
``lejepa/multivariate/slicing.py``, ``MINIMAL.md``).

Each image gives V = V_g + V_l views (V_g global crops first, then V_l smaller local crops, DINO's
multi-crop, Sec. 5.1); z_{n,v} = g(f(x_{n,v})) in R^K is the projector's output for view v of image n in a
batch of B images. The objective (Eq. LeJEPA, Algorithm 2) is

    L = (1 - lambda) L_pred + lambda (1/V) sum_v SIGReg({z_{n,v}}_{n=1..B})

    L_pred = 1/(V B K) sum_{v,n,k} (mu_{n,k} - z_{n,v,k})^2,   mu_n = (1/V_g) sum_{v <= V_g} z_{n,v}

every view (global and local) predicting the mean of the global views' embeddings, with no stop-gradient
(Eqs. 5-7; the mean over K as Algorithm 2's ``.square().mean()``). SIGReg (Def. 2) slices the embeddings
along M random unit directions a_1..a_M, resampled at every step, and tests each slice against N(0, 1)
with the Epps-Pulley statistic (Sec. 4.2.3, Algorithm 1):

    SIGReg(Z) = (1/M) sum_m EP({a_m^T z_n}_n)
    EP(x)     = N int_R |phi_N(t) - exp(-t^2/2)|^2 w(t) dt,   phi_N(t) = (1/N) sum_n exp(i t x_n),
    w(t)      = exp(-t^2/2)  (Algorithm 1's ``.mul(exp_f)``),

with N the global batch size. |phi_N(t) - phi(t)|^2 = (mean cos(t x) - exp(-t^2/2))^2 + (mean sin(t x))^2
is even in t, so the integral over [-t_max, t_max] is twice the one over [0, t_max], taken with the
trapezoidal rule on ``num_knots`` knots (the official ``EppsPulley``: the symmetry doubles the knots for free,
Sec. 5.1).

Collapse: there is no negative, predictor, teacher or stop-gradient. SIGReg asks every one-dimensional
projection of the batch to be distributed as N(0, 1), so a constant embedding (phi_N = 1 on every slice)
costs N int (1 - e^{-t^2/2})^2 e^{-t^2/2} dt = 0.409 N per slice, a low-rank one the same along the
directions it lacks, while Gaussian embeddings score O(1) (1.06 in expectation: the statistic's
sampling noise). By Cramer-Wold, matching every slice matches the isotropic Gaussian, which the paper shows
minimises the downstream prediction risk (Sec. 3); the prediction term alone would collapse.

Distributed: the empirical characteristic function is a mean over the GLOBAL batch. Each rank sums
cos(t x_n) and sin(t x_n) over its rows, one all-reduce (with gradient: its backward all-reduces the
gradient too, so each rank's rows receive the sum over ranks of the identical losses' gradients) gives the
global sums, and N is the global count; every rank then holds the same SIGReg, and DDP's averaging of the
world-size-times summed gradient gives the single-process gradient (the official code all-reduces the ECF
the same way, Algorithm 1). The prediction term is per image, a local mean whose rank average is the
global mean. The directions must be the same on every rank: they are drawn from a generator seeded with
the step counter (a buffer, set alike on every rank in ``on_step_end`` and saved in checkpoints), as the
official ``SlicingUnivariateTest`` seeds them with its ``global_step``; the harness seeds each rank's
global RNG differently, so it cannot be used for them.

Deviations:
- Learning rate: the harness's linear warm-up and cosine decay end at 0; the official recipe ends at
  lr / 1000 (README, "Training Configuration").
- Directions are drawn on the CPU (then moved to the device), so that CPU and CUDA runs, and every rank,
  draw the same ones from the same seed; the official code draws them on the embeddings' device.
- The SIGReg statistic is computed in float32 with autocast off (the ECF of a bf16 projection loses the
  phase at large t); the official runs keep the whole step in bf16.
- Views: the crops are resized bilinearly with antialiasing and the horizontal flip comes right after the
  crop (the official pipeline flips last; it commutes with the per-pixel colour operations), which the
  harness runs batched on the device. The blur (kernel 10% of the crop's side, sigma 0.1-2) is dropped
  below 64 px, as SimCLR does on CIFAR-10.
- Local crops are 96/224 of the global side (Experiment Details 1: 224 and 96 px); the official README
  gives 98 px.
"""

from __future__ import annotations

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
    lambd: float = 0.05
    """lambda, the single trade-off between prediction and SIGReg (Sec. 6.1: "we recommend lambda = 0.05";
    Fig. 8, Table 7)."""
    num_slices: int = 1024
    """M = |A|, random directions per step (Sec. 6.1 and Table 1a: "1024 slices as starting points"; the
    official README's example uses 1024, Algorithm 1's signature 256)."""
    t_max: float = 5.0
    """Integration domain [-t_max, t_max] of the Epps-Pulley integral (Sec. 6.1: "[-5, 5]"; Algorithm 1;
    the official ``EppsPulley`` defaults to 3)."""
    num_knots: int = 17
    """Trapezoid knots on [0, t_max], mirrored to [-t_max, 0] by symmetry (Sec. 6.1: "17 integration
    points"; official ``EppsPulley(n_points=17)``)."""
    n_global_views: int = 2
    """V_g (Sec. 6.1 and Experiment Details 1: two global views)."""
    n_local_views: int = 6
    """V_l: V = 8 views of which 2 are global (Experiment Details 1; official README: "2 global views and
    6 local views"). Sec. 6.1 also names V_l = 8 (Table 1b)."""
    proj_hidden_dim: int = 2048
    """Width of the projector's two hidden layers (official ``MINIMAL.md``:
    ``MLP(512, [2048, 2048, proj_dim], norm_layer=BatchNorm1d)``; not stated in the paper)."""
    proj_dim: int = 128
    """K, the projector's output where both terms act. Not stated in the paper as a default: Table 1d
    ablates 64-1024 (128 is the row that matches the other ablations' figures); ``MINIMAL.md`` uses 16."""
    global_crop_scale: tuple[float, float] = (0.3, 1.0)
    """Area range of the global crops (official README, "Data augmentation and views")."""
    local_crop_scale: tuple[float, float] = (0.05, 0.3)
    """Area range of the local crops (official README)."""
    local_crop_ratio: float = 96 / 224
    """Side of a local crop over a global one: 96 px vs. 224 px (Experiment Details 1)."""
    optimizer: str = "adamw"
    """AdamW (Experiment Details 1; official README)."""
    base_lr: float = 5e-4
    """lr 5e-4 (official README: "good starting point"; Experiment Details 1 searches {5e-3, 5e-4}); the
    README gives it unscaled, here per 256 images at the batch of 256."""
    weight_decay: float = 5e-2
    """Official README: 5e-2 for ViTs, 5e-4 for ResNets (Experiment Details 1 searches {1e-1, 1e-2, 1e-5})."""
    betas: tuple[float, float] = (0.9, 0.999)
    """PyTorch's AdamW defaults (Experiment Details 1: "optimizers/schedulers are from PyTorch without
    modifications")."""
    warmup_epochs: int = 1
    """Linear warm-up (Experiment Details 1); its length is not stated in the paper: one epoch in the official
    ``MINIMAL.md`` (``warmup_steps = len(train)``)."""
    epochs: int = 100
    """ImageNet-1k pretraining for 100 epochs (Table 1, Sec. 6.4)."""
    batch_size: int = 256
    """Sec. 6.1 recommends batch >= 128 (Table 1c: 128-1024); ``MINIMAL.md`` trains with 256."""
    sync_batchnorm: bool = True
    """Not stated in the paper (``MINIMAL.md`` runs on one GPU): global BN statistics in the projector, so
    that it sees the same global batch as SIGReg."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn), k-NN
# of the backbone features (random init: 83.9%):
# - n_local_views 4: each 16-px local crop costs a quarter of a global one (DINO's small preset does the same);
# - global_crop_scale (0.4, 1.0), local_crop_scale (0.14, 0.4): 5% of an 8x8 digit upscaled to 32 px is a blob;
# - proj_hidden_dim 512, proj_dim 64: the 2048-wide projector costs several times the small CNN; 64, the
#   narrowest width Table 1d ablates;
# - weight_decay 5e-4: the official README's value for convolutional backbones;
# - base_lr 2e-3 per 256 (5e-4 at batch 64, the README's starting point) and lambd 0.05 (the paper's): the runs
#   below, each `selfsup train lejepa --no-progress [--set ...]`, k-NN / linear probe / RankMe:
#   - this preset:                   k-NN 91.4%, linear 98.6%, RankMe 44.2 (final SIGReg 4.3, pred 0.28);
#   - base_lr 4e-3:                  k-NN 88.9%, linear 98.9%, RankMe 38.8;
#   - lambd 0.1:                     k-NN 87.8%, linear 99.4%, RankMe 44.8 (SIGReg 2.9, pred 0.42);
#   - lambd 0.02 (``MINIMAL.md``'s): k-NN 85.0%, linear 98.9%, RankMe 44.7 (SIGReg 8.7, pred 0.15).
#   A larger lr or either lambda moved k-NN down; the preset keeps the README's lr and the paper's lambda.
PRESETS = {
    "small": dict(n_local_views=4, global_crop_scale=(0.4, 1.0), local_crop_scale=(0.14, 0.4),
                  proj_hidden_dim=512, proj_dim=64, weight_decay=5e-4, base_lr=2e-3),
}


# --- augmentations (official README: multi-crop with one colour recipe for every view) -------------------


def local_crop_size(cfg: Config, image_size: int) -> int:
    """The local crops' side: the 96/224 ratio rounded to a multiple of 8 (96 is one: six ViT-S/16 patches);
    16 px at 32 px, i.e. four 4-px patches, 2x2 after three poolings."""
    return max(8, 8 * round(image_size * cfg.local_crop_ratio / 8))


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """V_g global then V_l local views, each its own v2 pipeline; global and local crops differ only in size
    and area range. Every view: flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, blur
    p=0.5, solarisation p=0.2 (official README). Each takes a PIL image or a uint8 tensor."""

    def make(size: int, scale: tuple[float, float]) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # 10% of the crop's side, odd
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
        steps += [
            v2.RandomSolarize(threshold=128, p=0.2),  # on uint8 values, before ToDtype
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
        return v2.Compose(steps)

    local = local_crop_size(cfg, image_size)
    return ([make(image_size, cfg.global_crop_scale) for _ in range(cfg.n_global_views)]
            + [make(local, cfg.local_crop_scale) for _ in range(cfg.n_local_views)])


# --- backbone on crops of several sizes, and the projector ------------------------------------------------


# copied from dino.py: a ViT's position embeddings resized to the local crops' patch grid
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


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """g: Linear-BN-ReLU, Linear-BN-ReLU, Linear (torchvision ``MLP(in, [h, h, out], norm_layer=BatchNorm1d)``
    as in the official ``MINIMAL.md``)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


# --- SIGReg: random slices and the Epps-Pulley statistic -----------------------------------------------


def slice_directions(dim: int, num_slices: int, seed: int) -> torch.Tensor:
    """A (K, M) matrix of M unit directions in R^K, Gaussian then normalised (uniform on the sphere), drawn
    on the CPU from a generator seeded with ``seed``: the same on every rank and device (Algorithm 1)."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(dim, num_slices, generator=g)  # (K, M)
    return a / a.norm(dim=0, keepdim=True)


def quadrature(t_max: float, num_knots: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, w, phi): knots t on [0, t_max], trapezoid weights doubled for [-t_max, 0] (the integrand is even)
    and multiplied by the window w(t) = exp(-t^2/2), and phi(t) = exp(-t^2/2), the CF of N(0, 1). (T,) each."""
    t = torch.linspace(0.0, t_max, num_knots, dtype=torch.float64, device=device)  # (T,)
    dt = t_max / (num_knots - 1)
    trap = torch.full_like(t, 2 * dt)  # interior knots: dt each side of 0
    trap[[0, -1]] = dt  # t = 0 and t = t_max once each (t = 0 is shared by both halves)
    phi = torch.exp(-0.5 * t.square())
    return t, trap * phi, phi


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks: each rank's input receives the gradient
    of the sum of every rank's (identical) loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def epps_pulley(x: torch.Tensor, t_max: float = 5.0, num_knots: int = 17) -> torch.Tensor:
    """EP statistic of every column of x against N(0, 1) (Sec. 4.2.3, Algorithm 1). x: (..., N, M), the
    projections of this rank's N rows on M slices; under torch.distributed the ECF is over the global batch.
    Returns (..., M): N_global * sum_t w_t [(mean cos(t x) - phi(t))^2 + (mean sin(t x))^2]."""
    t, w, phi = quadrature(t_max, num_knots, x.device)
    t, w, phi = t.to(x.dtype), w.to(x.dtype), phi.to(x.dtype)
    xt = x.unsqueeze(-1) * t  # (..., N, M, T)
    sums = torch.stack([xt.cos().sum(dim=-3), xt.sin().sum(dim=-3)])  # (2, ..., M, T)
    n = torch.tensor(float(x.shape[-2]), dtype=x.dtype, device=x.device)
    if _distributed():
        sums = _AllReduceSum.apply(sums)  # global sums of cos and sin, gradient to every rank's rows
        dist.all_reduce(n)  # global N (no gradient)
    cos_mean, sin_mean = sums[0] / n, sums[1] / n  # (..., M, T): Re and Im of phi_N(t)
    err = (cos_mean - phi).square() + sin_mean.square()  # |phi_N(t) - phi(t)|^2
    return (err @ w) * n  # (..., M), the trapezoid sum of Algorithm 1 times N


def sigreg(z: torch.Tensor, directions: torch.Tensor, t_max: float = 5.0, num_knots: int = 17) -> torch.Tensor:
    """SIGReg (Def. 2): the EP statistic averaged over the slices, for each view. z: (..., N, K) embeddings
    (a leading view axis is allowed); directions: (K, M) unit columns. Returns (...,), float32 or float64."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        x = z.to(dtype) @ directions.to(z.device, dtype)  # (..., N, M)
        return epps_pulley(x, t_max, num_knots).mean(dim=-1)


def prediction_loss(z: torch.Tensor, n_global: int) -> torch.Tensor:
    """L_pred (Eqs. 5-7, Algorithm 2): every view's embedding predicts the mean of the global views'.
    z: (V, N, K), the V_g = n_global global views first. Mean over views, images and dimensions."""
    centers = z[:n_global].mean(dim=0)  # (N, K), mu_n; no stop-gradient (Sec. 5.1)
    return (centers - z).square().mean()


def lejepa_loss(z: torch.Tensor, n_global: int, directions: torch.Tensor, lambd: float, t_max: float = 5.0,
                num_knots: int = 17) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, L_pred, SIGReg averaged over the views), Eq. LeJEPA / Algorithm 2. z: (V, N, K)."""
    pred = prediction_loss(z, n_global)
    reg = sigreg(z, directions, t_max, num_knots).mean()  # mean over the V views
    return (1 - lambd) * pred + lambd * reg, pred, reg


# --- model ----------------------------------------------------------------------------------------


class LeJEPA(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        # seeds this step's directions; the same on every rank, saved with the checkpoint
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def project(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """(V, N, K) projections: one backbone call per run of views of the same size, one projector call."""
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(encode(self.backbone, torch.cat(list(views[start:end]))))  # (k N, D)
            start = end
        z = self.projector(torch.cat(feats))  # (V N, K)
        return z.view(len(views), len(views[0]), -1)

    def directions(self, device=None) -> torch.Tensor:
        return slice_directions(self.cfg.proj_dim, self.cfg.num_slices, int(self.step)).to(device)

    def forward(self, batch: dict) -> dict:
        views = batch["views"]  # V_g global (N, C, H, W), then V_l local (N, C, h, w)
        z = self.project(views)  # (V, N, K)
        n_global = min(self.cfg.n_global_views, len(views))
        loss, pred, reg = lejepa_loss(z, n_global, self.directions(z.device), self.cfg.lambd, self.cfg.t_max,
                                      self.cfg.num_knots)
        with torch.no_grad():
            z_std = z.float().std(dim=1).mean()  # 1 at the isotropic Gaussian target
        return {"loss": loss, "pred": pred.detach(), "sigreg": reg.detach(), "z_std": z_std}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """New directions for the next step (Sec. 4.3: resampled after each gradient step)."""
        self.step.fill_(step)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features f(x): the paper probes the backbone, not the projector (Sec. 6; ``MINIMAL.md``'s
        probe reads the backbone's output)."""
        return encode(self.backbone, x)


MODEL = LeJEPA


if __name__ == "__main__":
    a = slice_directions(16, 256, 0)
    low_rank = torch.cat([torch.randn(512, 8), torch.zeros(512, 8)], dim=1)  # half the dimensions collapsed
    for name, z in [("gaussian", torch.randn(512, 16)), ("low rank", low_rank), ("collapsed", torch.zeros(512, 16))]:
        print(f"{name}: SIGReg {sigreg(z, a).item():.3f}")
