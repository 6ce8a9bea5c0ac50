"""VICRegL — Bardes, Ponce, LeCun. "VICRegL: Self-Supervised Learning of Local Visual Features". NeurIPS 2022,
arXiv:2210.01571. Catalog id: ``vicregl``. Official code: https://github.com/facebookresearch/VICRegL
(``main_vicregl.py``, ``transforms.py``, ``utils.py``).

Two views of each image go through the encoder f. The pooled representation y goes through the expander
h, z = h(y) (N, D), as in VICReg; the last feature map of f (before the global pooling) goes, location by
location, through a second MLP, the local projector h_l, giving L = H W local embeddings per view,
u (N, L, C). With the VICReg criterion on paired sets of vectors A, B (N rows each),

    l(A, B) = lambda s(A, B) + mu [v(A) + v(B)] / 2 + nu [c(A) + c(B)] / 2,
    s = mean squared difference, v(A) = mean_j max(0, gamma - sqrt(Var(a^j) + eps)),
    c(A) = 1/d sum_{i != j} Cov(A)_ij^2                                        (VICReg's Eqs. 1-6)

the loss weighs the global criterion against the local ones with alpha (the paper's objective, as
``main_vicregl.py`` computes it)

    loss = alpha l(z, z') + (1 - alpha) [L_loc + L_feat].

Local criteria. For every local embedding u_p of view 1, its match in view 2 is
    location-based (L_loc):  q(p) = argmin_q || loc_p - loc'_q ||, the positions mapped into the image the
                             views were cut from through the crop boxes (and flips);
    feature-based (L_feat):  q(p) = argmin_q || u_p - u'_q ||, in embedding space;
only the k pairs with the smallest distance are kept (the paper's top-gamma filter, k = ``num_matches``:
official ``--num_matches 20 4``, and every pair for the feature-based matching, ``--l2_all_matches 1``),
and l is applied to the kept pairs (u_p, u'_q(p)) in the raster order of p: the invariance over all of
them, the variance and covariance over the batch for each of the k slots, averaged over the slots
(``_vicreg_loss`` of the code). Each criterion is the mean of its two directions (1 -> 2 and 2 -> 1),
and, as in the code, the ordered view pairs (1, 2) and (2, 1) are averaged, so that each direction is
filtered once with num_matches[0] and once with num_matches[1].

Crop geometry: the harness hands the model views as tensors and does not pass the random-resized-crop
boxes, so the method draws the crops itself. ``augmentations`` declares the photometric part of the recipe
on the whole image (a deterministic square resize to image_size, then colour jitter, grayscale, blur,
solarisation, normalisation), which the harness runs batched; ``forward`` then cuts a random resized crop
of each view (torchvision's sampling of area and ratio, 10 tries, then the centre crop) and flips it,
with known boxes, and places the centre of every feature-map cell in the coordinates of the whole image
(official ``_location_to_NxN_grid``).

Collapse: as in VICReg, the variance hinge keeps the standard deviation of every embedding dimension over
the batch at gamma, and the covariance term decorrelates the dimensions, for the global embeddings and for
every slot of matched local embeddings; nothing else compares different images.

Distributed: every variance and covariance, global and local, is a statistic of the GLOBAL batch. The
global embeddings and the matched local embeddings (N, k, C) are all-gathered with gradient
(``gather_with_grad``) and every rank computes the loss of the concatenated batch; DDP's averaging of the
world-size-times summed gradient gives the single-process gradient. The matching is per image and needs
no communication. The crop boxes are drawn for the global batch from the global RNG and each rank takes
its own rows, so that under equally seeded ranks the crops are those of one process on the concatenated
batch (in training the harness seeds each rank apart, and the ranks' crops are independent draws). The
heads' BN is global with SyncBatchNorm, as the official code converts the model.

Deviations:
- The random resized crop and the flip run inside ``forward`` on the colour-distorted whole image
  (bilinear ``grid_sample``, no antialiasing), not first as in the official pipeline: the crop boxes are
  needed and the harness does not pass them. Brightness, saturation, hue, grayscale and normalisation
  commute with the crop; contrast (the image mean) and solarisation differ slightly, and the blur kernel is
  scaled by the crop's zoom. The resampling is bilinear (the code: bicubic), and at the box's edge it reads
  the pixels around the box, where torchvision clamps to the cut-out crop. Crops are cut from the image_size
  version of the image, which loses detail on images larger than image_size (none on the 32-px data sets).
  Harness change that would remove this deviation: ``views.ResizedCrop`` / ``HorizontalFlip`` returning
  their boxes and flips, passed in the batch (e.g. ``batch["boxes"]``: V tensors (N, 5) of top, left,
  height, width, flipped, in source-image pixels); ``augmentations`` would then declare the crop and flip
  first, as the official pipeline, and ``forward`` would read the boxes instead of drawing them.
- The location grid follows the flip (``flip_grid``); the official default ``--no-flip-grid 1`` leaves
  it unflipped, so that a flipped view's cells are matched to mirrored positions.
- The variance and covariance of the two views are averaged (``/ 2``), as ``main_vicregl.py`` computes
  both; VICReg's Eq. 6 adds them. The invariance is ``F.mse_loss`` (mean over entries), as the code.
- The invariance is taken on the gathered rows (the code: each rank's own rows, the same mean).
- Two views, the ResNet-50 setting of the official README (``--num-crops 2``); the ConvNeXt setting's
  six 96-px crops (3 x 3 maps) are not built. The online linear classifier of the code is left out (the
  harness evaluates with k-NN and linear probes on frozen features).
- Optimiser and schedule are the harness's: LARS with linear warm-up and cosine decay to 0; the code ends
  at 0.001 x the peak rate (``--end-lr-ratio``).
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
    alpha: float = 0.75
    """Weight of the global criterion, 1 - alpha on the local ones (official ``--alpha`` default and the README's
    ResNet-50 command; the README's models use 0.9 and 0.75)."""
    lambd: float = 25.0
    """Invariance coefficient lambda (official ``--inv-coeff``, VICReg's value)."""
    mu: float = 25.0
    """Variance coefficient mu (official ``--var-coeff``), on the mean of the two views' terms."""
    nu: float = 1.0
    """Covariance coefficient nu (official ``--cov-coeff``), on the mean of the two views' terms."""
    gamma: float = 1.0
    """Target standard deviation of each dimension (VICReg Sec. 4.1; the code's constant 1.0)."""
    eps: float = 1e-4
    """Added to the variance under the square root (the code's 0.0001, as VICReg)."""
    num_matches: tuple[int, int] = (20, 4)
    """Top-gamma location matches kept in the directions 1 -> 2 and 2 -> 1 of each ordered view pair (official
    ``--num_matches 20 4``, for 7 x 7 maps); capped at the number of locations of the map."""
    l2_all_matches: bool = True
    """Keep every feature-based match (official ``--l2_all_matches 1``); else num_matches as for locations."""
    flip_grid: bool = True
    """The location grid follows the flip. Not stated in the paper; the code's ``--no-flip-grid`` defaults to
    1 (grid not flipped): ``--set flip_grid=false``."""
    proj_hidden_dim: int = 8192
    """Hidden width of the global expander (official ``--mlp 8192-8192-8192``)."""
    proj_dim: int = 8192
    """Output dimension D of the global expander (official ``--mlp``)."""
    proj_layers: int = 3
    """Linear layers of the global expander: Linear-BN-ReLU twice, then Linear (official ``utils.MLP``)."""
    maps_hidden_dim: int = 512
    """Hidden width of the local projector (official ``--maps-mlp 512-512-512``)."""
    maps_dim: int = 512
    """Output dimension C of the local projector (official ``--maps-mlp``)."""
    maps_layers: int = 3
    """Linear layers of the local projector, applied at every location (official ``--maps-mlp``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the crops (the README's ResNet-50 command: ``--min_scale_crops 0.08``)."""
    max_scale: float = 1.0
    """Largest area fraction of the crops (``--max_scale_crops 1.0``)."""
    flip_prob: float = 0.5
    """Horizontal-flip probability (official ``RandomHorizontalFlipReturnsIfFlip(p=0.5)``)."""
    blur_prob: tuple[float, float] = (1.0, 0.1)
    """Gaussian-blur probability of each view (official ``get_color_distortion``: BYOL's 1.0 / 0.1)."""
    solarize_prob: tuple[float, float] = (0.0, 0.2)
    """Solarisation probability of each view (official ``get_color_distortion``: 0.0 / 0.2)."""
    optimizer: str = "lars"
    """LARS for the ResNet-50 (the README's command ``--optimizer lars``; AdamW for ConvNeXt)."""
    base_lr: float = 0.3
    """lr = batch_size / 256 x base_lr (the README's ResNet-50 command ``--base-lr 0.3``; ``learning_schedule``)."""
    weight_decay: float = 1e-6
    """The README's ResNet-50 command (``--weight-decay 1e-06``)."""
    momentum: float = 0.9
    """Not stated in the paper; the official LARS's."""
    warmup_epochs: int = 10
    """Linear warm-up epochs (official ``--warmup-epochs`` default)."""
    epochs: int = 100
    """The README's ResNet-50 command (``--epochs 100``)."""
    batch_size: int = 512
    """The README's ResNet-50 command (``--batch-size 512``, the global batch)."""
    sync_batchnorm: bool = True
    """Not stated in the paper; the official code converts the model to SyncBatchNorm."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# k-NN figures are from `selfsup train vicregl --set ...` runs, random init 0.839):
# - proj_hidden_dim, proj_dim 1024: as vicreg's small preset (three 8192-wide layers are nine times the small
#   CNN);
# - maps_hidden_dim, maps_dim 256: the local projector runs at each of the 16 cells of the small CNN's 4 x 4
#   map; at 512 it would cost about 70% of the backbone, at 256 about 20%;
# - num_matches (6, 2): the paper keeps 20 of 49 cells (7 x 7); 6 of 16 keeps the same share;
# - warmup_epochs 2, min_scale 0.4: as vicreg's small preset (10 warm-up epochs are two thirds of the run;
#   8% crops of an 8 x 8 digit upscaled to 32 px leave a blob);
# - base_lr 0.2 (a peak lr of 0.05), vicreg's small-preset rate: the README's 0.3 gave 0.844 (linear 0.989),
#   0.2 gave 0.875 (linear 0.983, 362 s), 0.2 with alpha 0.9 (the README's other ResNet-50 model) 0.881
#   (linear 0.983): two test images, within run-to-run noise, so alpha stays at the paper's 0.75. The plain
#   `selfsup train vicregl` with this preset repeats 0.875 exactly (linear 0.983; random init 0.986).
# In 330 steps the std of the global embeddings stays near 0.3 (variance term ~0.7), as in vicreg's runs.
PRESETS = {"small": dict(proj_hidden_dim=1024, proj_dim=1024, maps_hidden_dim=256, maps_dim=256, num_matches=(6, 2),
                         warmup_epochs=2, min_scale=0.4, base_lr=0.2)}


# --- augmentations (official transforms.py) -------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views of the whole image with their own colour distortion: colour jitter (p=0.8), grayscale
    (p=0.2), blur and solarisation with the per-view probabilities of ``cfg``. The crop and flip are drawn in
    ``forward`` (the location matching needs their boxes); the crop here, of the whole image (scale 1, ratio
    1), is only a square resize to image_size, so that images of any size stack. Each view is one v2 pipeline;
    it takes a PIL image or a uint8 tensor."""

    def make(blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), antialias=True),  # deterministic
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


# --- crops with known boxes, and where each feature-map cell lies ----------------------------------


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def draw_crops(n_local: int, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """((n_local, 4) float boxes (top, left, height, width) in pixels, (n_local,) bool flips): this rank's rows
    of one draw for the global batch, with torchvision's RandomResizedCrop sampling (area and log-ratio
    uniform, the first of 10 tries that fits, else the centre crop of the clamped ratio), on the CPU."""
    world, rank = _world()
    n = world * n_local
    target = height * width * torch.empty(n, 10).uniform_(scale[0], scale[1])  # (n, 10) areas
    aspect = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()  # (n, 10)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # (n, 1): the first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # (n,)
    # the fallback: the whole image, cut to the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    ok = fits.any(dim=1)
    w, h = torch.where(ok, w, float(fw)), torch.where(ok, h, float(fh))
    top = torch.where(ok, (torch.rand(n) * (height - h + 1)).floor(), float((height - fh) // 2))
    left = torch.where(ok, (torch.rand(n) * (width - w + 1)).floor(), float((width - fw) // 2))
    flips = torch.rand(n) < flip_prob
    rows = slice(rank * n_local, (rank + 1) * n_local)
    return torch.stack([top, left, h, w], dim=1)[rows], flips[rows]


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cut box b of image i, flip it where flips[i], and resize it bilinearly to size, as one batched
    ``grid_sample`` (as ``F.resized_crop`` without antialiasing). x: (N, C, H, W), boxes (N, 4) in pixels."""
    n, c, height, width = x.shape
    top, left, h, w = boxes.to(x.device, x.dtype).unbind(1)  # (N,) each
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = torch.where(flips.to(x.device), -w / width, w / width)  # output x in [-1, 1] -> input x
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, c, *size], align_corners=False)  # (N, S_h, S_w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grid_locations(boxes: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h w, 2) the (row, col) centres of an h x w feature map's cells, in pixels of the image the crop was
    cut from, in the map's raster order; a flipped view's columns run right to left (``_location_to_NxN_grid``)."""
    top, left, height, width = boxes.float().unbind(1)  # (N,) each
    rows = top[:, None] + (torch.arange(h) + 0.5) / h * height[:, None]  # (N, h)
    frac = (torch.arange(w) + 0.5) / w  # (w,)
    frac = torch.where(flips.cpu()[:, None], 1 - frac, frac)  # (N, w)
    cols = left[:, None] + frac * width[:, None]  # (N, w)
    rows, cols = torch.broadcast_tensors(rows[:, :, None], cols[:, None, :])  # (N, h, w) each
    return torch.stack([rows, cols], dim=-1).flatten(1, 2)  # (N, h w, 2)


# --- the feature map inside the backbone (as dim.py) ------------------------------------------------


def _reduces(m: nn.Module) -> bool:
    """A layer that lowers the resolution of a feature map, global pooling (to 1 x 1) excluded."""
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Conv2d)):
        stride = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
        return tuple(stride) != (1, 1)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        return tuple(size) != (1, 1)
    return False


def find_feature_maps(backbone: nn.Module) -> tuple[str, int, int]:
    """(the name of the backbone's last spatial reduction of a feature map, the channels of the map it
    receives, the channels of the backbone's final map), from the module tree in registration order: a
    strided conv's in_channels, or for a pool the width of the last conv or BN before it."""
    width, found = None, None
    for name, m in backbone.named_modules():
        if next(m.children(), None) is not None:
            continue  # leaves only
        if _reduces(m):
            incoming = m.in_channels if isinstance(m, nn.Conv2d) else width
            if width is not None:  # a reduction before any conv works on the image itself
                found = (name, incoming)
        if isinstance(m, nn.Conv2d):
            width = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            width = m.num_features
    if found is None:
        raise ValueError(f"{type(backbone).__name__}: no feature map found (no pooling or strided convolution after a "
                         "convolution); a convolutional backbone is needed")
    return found[0], found[1], width


def forward_with_maps(backbone: nn.Module, x: torch.Tensor, reduction: str,
                      final: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward of the backbone: (its output (N, D), the map entering its submodule ``reduction``
    (N, C, H, W), and with ``final`` the last map of more than 1 x 1 that any layer outputs, else None).
    The hooks live only for this call."""
    maps: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        maps["local"] = args[0]

    def keep_output(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
            maps["final"] = out

    handles = [backbone.get_submodule(reduction).register_forward_pre_hook(keep_input)]
    if final:
        handles += [m.register_forward_hook(keep_output) for m in backbone.modules() if next(m.children(), None) is None]
    try:
        y = backbone(x)
    finally:
        for h in handles:
            h.remove()
    return y, maps["local"], maps.get("final")


# --- heads ----------------------------------------------------------------------------------------


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3) -> nn.Module:
    """(layers - 1) x [Linear - BN - ReLU], then a Linear without bias (official ``utils.MLP`` with BN, the
    ResNet setting): the expander h and the local projector h_l."""
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


def global_terms(z1: torch.Tensor, z2: torch.Tensor, gamma: float = 1.0,
                 eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, [v(Z) + v(Z')] / 2, [c(Z) + c(Z')] / 2) of the global batch, as the code's ``global_loss``.
    z1, z2: (N, D) this rank's embeddings of the two views."""
    z1, _ = gather_with_grad(z1)  # (N_global, D)
    z2, _ = gather_with_grad(z2)
    var = (variance_loss(z1, gamma, eps) + variance_loss(z2, gamma, eps)) / 2
    return invariance_loss(z1, z2), var, (covariance_loss(z1) + covariance_loss(z2)) / 2


def slot_variance(u: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """v over the batch for every slot and dimension, averaged: u (N, K, C) -> scalar."""
    std = torch.sqrt(u.var(dim=0) + eps)  # (K, C)
    return F.relu(gamma - std).mean()


def slot_covariance(u: torch.Tensor) -> torch.Tensor:
    """c over the batch for every slot, averaged over the K slots: u (N, K, C) -> scalar."""
    n, _, c = u.shape
    u = u - u.mean(dim=0)
    cov = torch.einsum("nkc,nkd->kcd", u, u) / (n - 1)  # (K, C, C)
    off = cov.pow(2).sum(dim=(1, 2)) - cov.diagonal(dim1=1, dim2=2).pow(2).sum(dim=1)  # (K,)
    return (off / c).mean()


def local_terms(a: torch.Tensor, b: torch.Tensor, gamma: float = 1.0,
                eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, v, c) of matched local embeddings over the global batch, as the code's ``_vicreg_loss``: a, b
    (N, K, C) this rank's pairs (a[i, k], b[i, k])."""
    a, _ = gather_with_grad(a.contiguous())  # (N_global, K, C)
    b, _ = gather_with_grad(b.contiguous())
    var = (slot_variance(a, gamma, eps) + slot_variance(b, gamma, eps)) / 2
    return invariance_loss(a, b), var, (slot_covariance(a) + slot_covariance(b)) / 2


@torch.no_grad()
def nearest_matches(dist_: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k filter: (idx (N, k), nn (N, k)) from distances (N, L1, L2): the k positions of the first
    map whose nearest neighbour in the second is closest (ties: the lower index), in raster order, and
    that neighbour. k None keeps all L1 positions."""
    best, nn_idx = dist_.min(dim=2)  # (N, L1): distance to and index of each position's nearest neighbour
    k = best.shape[1] if k is None else min(k, best.shape[1])
    keep = best.sort(dim=1, stable=True).indices[:, :k].sort(dim=1).values  # (N, k)
    return keep, nn_idx.gather(1, keep)


def _take(u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """u (N, L, C), idx (N, K) -> (N, K, C)."""
    return u.gather(1, idx[:, :, None].expand(-1, -1, u.shape[2]))


def matched_terms(u1: torch.Tensor, u2: torch.Tensor, dist_: torch.Tensor, ks: tuple[int | None, int | None],
                  gamma: float, eps: float) -> tuple[torch.Tensor, ...]:
    """(s, v, c) of one matching, each the mean of the directions 1 -> 2 (top ks[0]) and 2 -> 1 (top ks[1]).
    u1 (N, L1, C), u2 (N, L2, C), dist_ (N, L1, L2)."""
    i, j = nearest_matches(dist_, ks[0])
    t12 = local_terms(_take(u1, i), _take(u2, j), gamma, eps)
    i, j = nearest_matches(dist_.transpose(1, 2), ks[1])
    t21 = local_terms(_take(u2, i), _take(u1, j), gamma, eps)
    return tuple((x + y) / 2 for x, y in zip(t12, t21))


def local_loss(u1: torch.Tensor, u2: torch.Tensor, loc1: torch.Tensor, loc2: torch.Tensor,
               num_matches: tuple[int, int] = (20, 4), l2_all_matches: bool = True, gamma: float = 1.0,
               eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, v, c) of L_feat + L_loc, averaged over the ordered view pairs (1, 2), (2, 1) as the
    code's ``local_loss``. u: (N, L, C) local embeddings, loc: (N, L, 2) their positions in the image."""
    feat_ks = (None, None) if l2_all_matches else tuple(num_matches)
    total = None
    for a, b, la, lb in ((u1, u2, loc1, loc2), (u2, u1, loc2, loc1)):
        feat = matched_terms(a, b, torch.cdist(a.detach(), b.detach()), feat_ks, gamma, eps)
        loc = matched_terms(a, b, torch.cdist(la, lb).to(a.device), tuple(num_matches), gamma, eps)
        terms = [f + g for f, g in zip(feat, loc)]
        total = terms if total is None else [t + x for t, x in zip(total, terms)]
    return tuple(t / 2 for t in total)


def vicregl_loss(z1: torch.Tensor | None, z2: torch.Tensor | None, u1: torch.Tensor | None, u2: torch.Tensor | None,
                 loc1: torch.Tensor | None, loc2: torch.Tensor | None, alpha: float = 0.75, lambd: float = 25.0,
                 mu: float = 25.0, nu: float = 1.0, num_matches: tuple[int, int] = (20, 4),
                 l2_all_matches: bool = True, gamma: float = 1.0,
                 eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha l(z, z') + (1 - alpha) [L_loc + L_feat]: (loss, the unweighted terms). z: (N, D) global
    embeddings (None when alpha = 0), u: (N, L, C) local embeddings and loc (N, L, 2) their positions (None when
    alpha = 1); under torch.distributed every rank returns the loss of the concatenated batch."""
    loss, terms = 0.0, {}
    if alpha > 0:
        inv, var, cov = global_terms(z1, z2, gamma, eps)
        loss = loss + alpha * (lambd * inv + mu * var + nu * cov)
        terms.update(invariance=inv, variance=var, covariance=cov)
    if alpha < 1:
        inv, var, cov = local_loss(u1, u2, loc1, loc2, num_matches, l2_all_matches, gamma, eps)
        loss = loss + (1 - alpha) * (lambd * inv + mu * var + nu * cov)
        terms.update(local_invariance=inv, local_variance=var, local_covariance=cov)
    return loss, terms


# --- model ----------------------------------------------------------------------------------------


class VICRegL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.reduction, _, self.map_channels = find_feature_maps(backbone)
        # heads only for the criteria in use: DDP expects every parameter to get a gradient (as the code)
        if cfg.alpha > 0:
            self.expander = mlp_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        if cfg.alpha < 1:
            self.maps_projector = mlp_head(self.map_channels, cfg.maps_hidden_dim, cfg.maps_dim, cfg.maps_layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, tuple[int, int]]:
        """A random resized crop and flip of each image, then (z (N, D), u (N, L, C), its boxes and flips, the
        map's size); z or u None where its criterion is off."""
        cfg = self.cfg
        n = x.shape[0]
        boxes, flips = draw_crops(n, x.shape[-2], x.shape[-1], (cfg.min_scale, cfg.max_scale), flip_prob=cfg.flip_prob)
        view = resized_crop(x, boxes, flips, tuple(x.shape[-2:]))  # (N, C, H, W)
        y, _, fmap = forward_with_maps(self.backbone, view, self.reduction, final=cfg.alpha < 1)  # (N, D), (N, C', h, w)
        z = self.expander(y) if cfg.alpha > 0 else None
        u, size = None, (0, 0)
        if cfg.alpha < 1:
            if fmap is None or fmap.shape[1] != self.map_channels:
                raise RuntimeError(f"VICRegL: no {self.map_channels}-channel feature map of more than 1 x 1 at "
                                   f"{tuple(view.shape[-2:])} px (the views are too small for the backbone)")
            size = tuple(fmap.shape[-2:])
            cells = fmap.flatten(2).transpose(1, 2)  # (N, h w, C'): one vector per location
            u = self.maps_projector(cells.reshape(-1, cells.shape[2])).view(n, cells.shape[1], -1)  # (N, L, C)
        return z, u, (boxes, flips), size

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each: colour-distorted whole images
        z1, u1, (b1, f1), s1 = self.encode(x1)
        z2, u2, (b2, f2), s2 = self.encode(x2)
        loc1 = loc2 = None
        if cfg.alpha < 1:
            no_flip = torch.zeros_like(f1)
            loc1 = grid_locations(b1, f1 if cfg.flip_grid else no_flip, *s1)  # (N, L, 2)
            loc2 = grid_locations(b2, f2 if cfg.flip_grid else no_flip, *s2)
        with torch.autocast(x1.device.type, enabled=False):  # batch statistics in float32
            fl = [None if t is None else t.float() for t in (z1, z2, u1, u2)]
            loss, terms = vicregl_loss(*fl, loc1, loc2, cfg.alpha, cfg.lambd, cfg.mu, cfg.nu, tuple(cfg.num_matches),
                                       cfg.l2_all_matches, cfg.gamma, cfg.eps)
        with torch.no_grad():
            std = (z1 if z1 is not None else u1.flatten(0, 1)).std(dim=0).mean()  # local batch; near 0: collapse
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, "std": std}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation y = f(x), the backbone's pooled features: the heads are discarded after
        pretraining, and the pooled representation is what the official linear evaluation uses for
        classification (``evaluate.py``); the local maps serve segmentation."""
        return self.backbone(x)


MODEL = VICRegL


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    u, loc = torch.randn(64, 16, 32, generator=g), torch.rand(64, 16, 2, generator=g) * 32
    z = torch.randn(64, 32, generator=g)
    for name, args in [("random", (z, torch.randn(64, 32), u, torch.randn(64, 16, 32), loc, loc)),
                       ("identical", (z, z, u, u, loc, loc))]:
        print(name, vicregl_loss(*args, num_matches=(6, 2))[0].item())
