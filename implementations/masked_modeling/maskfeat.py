"""MaskFeat — Wei, Fan, Xie, Wu, Yuille, Feichtenhofer. "Masked Feature Prediction for Self-Supervised Visual
Pre-Training". CVPR 2022, arXiv:2112.09133. Catalog id: ``maskfeat``. Official code:
https://github.com/facebookresearch/SlowFast (``projects/maskfeat``; ``slowfast/models/masked.py``
``MaskMViT._maskfeat_forward``, ``slowfast/models/operators.py`` ``HOGLayerC``,
``slowfast/datasets/transform.py`` ``MaskingGenerator``, ``configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml``).

The image setting (an image is a one-frame video, Sec. 3). A block-wise mask covers 40% of the patches
(BEiT's blocks). Every masked patch embedding is replaced by one shared learnable [MASK] token *inside the
encoder*, before the position embeddings are added, and the ViT runs on all L tokens. A linear head on
each output token predicts the Histograms of Oriented Gradients (HOG) of its patch in the intact image, and
the loss is the mean squared error over the masked patches only (Sec. 3):

    L = 1/(|M| K) sum_{i in M} || W z_i + b - h_i ||^2,     z = ViT(e_1, ..., e_L),  e_i = [MASK] if i in M

with M the masked patches of the batch, K = C x bins x (p / cell)^2 the target size (3 x 9 x 4 = 108 for
16-px patches of 8-px cells) and h_i the HOG of patch i, computed from the whole image and cut into
patches (official ``_get_hog_label_2d``):

    g_x = S_x * x_c,  g_y = S_y * x_c     Sobel filters [[1,0,-1],[2,0,-2],[1,0,-1]] and its transpose,
                                          per RGB channel c, reflect-padded (cross-correlation)
    m = sqrt(g_x^2 + g_y^2),  theta = atan2(g_x, g_y)
    bin = floor(9 theta / pi) mod 9       unsigned orientation, 9 bins of 20 degrees, hard assignment
    H[c, bin, cell] = sum_{pixels of the cell} m     (8 x 8-px cells)
    h[c, :, cell] = H[c, :, cell] / max(||H[c, :, cell]||_2, 1e-12)   L2 per cell and channel

The gradient filter is the official ``HOGLayerC``'s Sobel pair written above (a centred [1, 0, -1]
difference smoothed by [1, 2, 1] across it), not a bare [-1, 0, 1] difference, with
``atan2`` taking (g_x, g_y) in that order, floor binning (no soft vote between bins), no Gaussian window
(``MaskMViT`` builds ``HOGLayerC(nbins=9, pool=8)``, so ``gaussian_window=0``) and the three RGB channels
kept apart and concatenated (the paper's RGB HOG). ``hog_sobel=False`` uses the plain [1, 0, -1] difference.
The local contrast normalisation (the L2 step) is what the paper finds essential (abstract).
HOG runs on the normalised view, as officially; the per-cell L2 normalisation removes each channel's scale.

Collapse: none to prevent. The target is a fixed function of the input, so a constant representation cannot
make the loss small; the masking keeps the task from being solved by copying the visible patch.

Backbone: a ViT with ``patch_embed`` (a strided conv, kernel = stride = p), ``pos_embed`` (L, D) for a square
grid, ``cls_token``, ``blocks`` and ``norm`` (selfsup's ``vit_tiny``: ``--backbone vit_tiny``);
:func:`masked_tokens` walks these parts to put the mask token in. Another backbone gets a one-line error.

Features for evaluation (``embed``): the mean of the patch tokens of the whole, unmasked image after the
last block, layer-normalised: the official fine-tuning model (``in1k_VIT_B_MaskFeat_FT.yaml``:
``USE_MEAN_POOLING: True``, mean then ``norm``; that ``norm`` is not in the pre-trained checkpoint, so it is
a plain LayerNorm at weight 1, bias 0, i.e. no affine here). The paper evaluates by fine-tuning.

Deviations:
- the encoder is the harness's ViT: fixed 2-D sin-cos position embeddings on the patches only (officially
  learned, ``USE_ABS_POS``, also on the CLS token), PyTorch's default initialisation, LayerNorm eps 1e-5;
  the ViT's own final ``norm`` serves as the head's LayerNorm (officially the encoder's norm is deleted and
  the head ``MSSeparateHead`` has its own LayerNorm then the Linear: the same computation);
- the crop is resized bilinearly, not bicubically (official ``AUG.INTERPOLATION`` "bicubic"), so that it
  runs batched on the device;
- the harness has no gradient clipping (official ``CLIP_GRAD_L2NORM: 0.02``), warms up from 0 and decays to
  0 (official ``WARMUP_START_LR``, ``COSINE_END_LR`` 1e-6); biases and norms get no weight decay, as
  ``ZERO_WD_1D_PARAM``;
- the Sobel filter is applied as a difference along one axis, then the [1, 2, 1] smoothing along the other
  (the same linear filter as the official grouped ``conv2d``, equal to it within float rounding), so that a
  flat region has exactly zero gradient and a zero histogram. The float32 conv leaves residues of ~1e-8
  there, and the L2 step turns those into unit-length histograms, a target made of rounding noise (13% of the
  digits' patches are flat). Natural images have few such regions;
- the masks are drawn in ``forward`` (official: in the data loader, one image at a time), with the official
  ``MaskingGenerator`` rule vectorised over the batch (one candidate block per image per round, an image stops
  at its count or after 10 rejected candidates in a row, as there): the same distribution, other random
  numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    mask_ratio: float = 0.4
    """Share of patches masked, round(L x ratio) of them (official ``AUG.MASK_RATIO: 0.4`` in
    ``in1k_VIT_B_MaskFeat_PT.yaml``; the paper's 40% block-wise masking for images)."""
    mask_min_aspect: float = 0.3
    """Smallest aspect ratio of a mask block, the largest being its inverse (official ``MaskingGenerator``
    default ``min_aspect=0.3``, as BEiT). The smallest block is a fifth of the count (official
    ``min_mask = num_mask // 5``) and a block may hold the whole count (``MAX_MASK_PATCHES_PER_BLOCK: None``)."""
    hog_bins: int = 9
    """Orientation bins over 180 degrees (official ``MaskMViT``: ``self.nbins = 9``)."""
    hog_cell: int = 8
    """Side of a HOG cell in pixels: 2 x 2 cells in a 16-px patch (official ``self.cell_sz = 8``)."""
    hog_sobel: bool = True
    """Sobel gradient kernels as the official ``HOGLayerC``; False: the plain centred difference [1, 0, -1]."""
    min_scale: float = 0.5
    """Smallest area fraction of the random resized crop, with the flip the only augmentation (official
    ``DATA.TRAIN_JITTER_SCALES_RELATIVE: [0.5, 1.0]``, aspect [0.75, 1.3333]; no colour jitter or AutoAugment)."""
    optimizer: str = "adamw"
    """AdamW (official ``SOLVER.OPTIMIZING_METHOD: adamw``)."""
    base_lr: float = 2e-4
    """lr = base_lr x batch/256 (official ``SOLVER.BASE_LR: 0.0002 # bs256``, scaled by the number of
    nodes), cosine decay (``LR_POLICY: cosine``)."""
    weight_decay: float = 0.05
    """Official ``SOLVER.WEIGHT_DECAY: 0.05``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (official ``SOLVER.BETAS`` default; the image config does not change it)."""
    warmup_epochs: int = 30
    """Linear warm-up (official ``SOLVER.WARMUP_EPOCHS: 30.0``)."""
    epochs: int = 1600
    """ViT-B's schedule for its 84.0% fine-tuning result (the README's ``epoch_01600`` checkpoint; the
    config file's ``MAX_EPOCH: 300`` is the shorter schedule)."""
    batch_size: int = 2048
    """ImageNet batch: the official config has 256 per 8-GPU node (``TRAIN.BATCH_SIZE``), times the nodes
    through ``BASE_LR_SCALE_NUM_SHARDS``; the node count is not in the repository and the paper's text could not
    be checked here, so 2048 (8 nodes) is not verified."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64,
# ``--backbone vit_tiny``: 32 px, 4-px patches, an 8 x 8 grid):
# - hog_cell 2: the HOG cell scaled with the patch, 2 x 2 cells in a 4-px patch as 8-px cells in a 16-px one
#   (targets of 3 x 9 x 4 = 108 values per patch, as the paper's);
# - base_lr 2e-3, warm-up 2 epochs: 330 steps at the paper's rate (5e-5 after the batch scaling) hardly move
#   the encoder, and 30 warm-up epochs would be most of the run (as MAE's small preset).
# The mask ratio stays 0.4: 26 of the 64 patches, in blocks of at least 5.
# On digits (330 steps) this preset does not beat random init: k-NN 47.8% (random 53.9%), linear 96.7%
# (97.2%); the loss levels off near that of predicting the mean HOG. Tried: hog_cell=4 (one cell per patch,
# 27 values): k-NN 49.2%, linear 95.6%, not kept.
PRESETS = {"small": dict(hog_cell=2, base_lr=2e-3, warmup_epochs=2)}


# --- augmentations (official imagenet.py _prepare_im_masked, transforms_imagenet_train) -----------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: random resized crop (scale 0.5-1, aspect 3/4-4/3) and horizontal flip, nothing else. The
    block mask is drawn inside ``forward``. One v2 pipeline; it takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), ratio=(0.75, 1.3333), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- block-wise masks (official MaskingGenerator, after BEiT) ---------------------------------------------


def block_masking(n: int, h: int, w: int, ratio: float, min_aspect: float = 0.3,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Block-wise masks (N, h*w) bool, True where masked, patches in row-major grid order. Each image gets
    at most count = round(h w ratio) patches (official ``num_mask``), made of rectangles: a candidate of area
    U(count // 5, budget) and log-uniform aspect ratio in [min_aspect, 1/min_aspect] is accepted if it fits
    strictly inside the grid and adds between 1 and ``budget`` new patches (budget = what is left of the
    count); an image stops at its count or after 10 rejected candidates in a row. One candidate per image per
    round, all images at once. Pure: the same generator state gives the same masks (CPU)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio}: must be in [0, 1)")
    count = round(h * w * ratio)  # official round(), half to even
    min_patches = count // 5  # official min_mask
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    done = torch.zeros(n, dtype=torch.long)  # (N,) patches masked so far
    fails = torch.zeros(n, dtype=torch.long)  # (N,) rejected candidates in a row
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    active = done < count
    while active.any():
        u = torch.rand(4, n, dtype=torch.float64, generator=generator)  # (4, N)
        budget = (count - done).double()  # (N,) max_mask_patches
        area = min_patches + (budget - min_patches) * u[0]  # random.uniform(min, budget)
        aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
        bh = torch.round(torch.sqrt(area * aspect)).long()  # (N,) half to even, as Python's round
        bw = torch.round(torch.sqrt(area / aspect)).long()
        fits = (bw < w) & (bh < h)  # strictly smaller than the grid, as officially
        top = (u[2] * (h - bh + 1)).long().clamp(0, h - 1)  # random.randint(0, h - bh)
        left = (u[3] * (w - bw + 1)).long().clamp(0, w - 1)
        block = ((rows >= top.view(n, 1, 1)) & (rows < (top + bh).view(n, 1, 1))
                 & (cols >= left.view(n, 1, 1)) & (cols < (left + bw).view(n, 1, 1)))  # (N, h, w)
        new = (block & ~mask).sum(dim=(1, 2))  # (N,) patches the block would add
        accept = active & fits & (new > 0) & (new <= budget)
        mask |= block & accept.view(n, 1, 1)
        done += torch.where(accept, new, 0)
        fails = torch.where(accept, 0, fails + active.long())
        active = (done < count) & (fails < 10)
    return mask.flatten(1)  # (N, L)


# --- HOG targets (official HOGLayerC and _get_hog_label_2d) ------------------------------------------------


def hog_features(images: torch.Tensor, cell: int = 8, bins: int = 9, sobel: bool = True) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, bins, H/cell, W/cell): each channel's magnitude-weighted histogram of unsigned
    gradient orientations in every cell, L2-normalised over the bins (official ``HOGLayerC.forward``)."""
    n, c, h, w = images.shape
    if h % cell or w % cell:
        raise ValueError(f"images of {h}x{w} px do not split into HOG cells of {cell} px")
    s0, s1, s2 = (1.0, 2.0, 1.0) if sobel else (0.0, 1.0, 0.0)
    x = F.pad(images, (1, 1, 1, 1), mode="reflect")  # (N, C, H + 2, W + 2)
    # the official Sobel cross-correlation, taken as a difference then a smoothing: the same filter, but a
    # flat region gives exactly 0 (a float32 conv leaves ~1e-8 there, which the L2 step makes a unit histogram)
    dx = x[..., :, :-2] - x[..., :, 2:]  # (N, C, H + 2, W) x[i, j-1] - x[i, j+1]
    gx = s0 * dx[..., :-2, :] + s1 * dx[..., 1:-1, :] + s2 * dx[..., 2:, :]  # (N, C, H, W)
    dy = x[..., :-2, :] - x[..., 2:, :]  # (N, C, H, W + 2) x[i-1, j] - x[i+1, j]
    gy = s0 * dy[..., :-2] + s1 * dy[..., 1:-1] + s2 * dy[..., 2:]  # (N, C, H, W)
    magnitude = torch.hypot(gx, gy)  # (N, C, H, W)
    phase = torch.atan2(gx, gy)  # (N, C, H, W) in [-pi, pi], arguments in the official order
    index = torch.floor(phase / math.pi * bins).long() % bins  # unsigned: theta and theta + pi share a bin
    hist = torch.zeros(n, c, bins, h, w, dtype=images.dtype, device=images.device)
    hist.scatter_add_(2, index.unsqueeze(2), magnitude.unsqueeze(2))  # (N, C, bins, H, W) hard votes
    hist = hist.reshape(n, c, bins, h // cell, cell, w // cell, cell).sum(dim=(4, 6))  # (N, C, bins, h', w')
    return F.normalize(hist, p=2, dim=2)  # local contrast normalisation per cell and channel


def hog_targets(images: torch.Tensor, patch: int, cell: int = 8, bins: int = 9, sobel: bool = True) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, K): the HOG map of the whole image cut into patches, K = C bins (p/cell)^2 values
    per patch ordered (channel, bin, cell row, cell column), patches in row-major grid order (official
    ``_get_hog_label_2d``)."""
    if patch % cell:
        raise ValueError(f"patches of {patch} px do not split into HOG cells of {cell} px")
    hog = hog_features(images, cell, bins, sobel)  # (N, C, bins, h', w')
    n, c, b, hc, wc = hog.shape
    u = patch // cell  # cells per patch side
    t = hog.reshape(n, c * b, hc // u, u, wc // u, u)  # (N, C bins, gh, u, gw, u)
    t = t.permute(0, 2, 4, 1, 3, 5)  # (N, gh, gw, C bins, u, u)
    return t.reshape(n, (hc // u) * (wc // u), c * b * u * u)  # (N, L, K)


# --- loss -----------------------------------------------------------------------------------------------


def maskfeat_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only (official ``MultipleMSELoss``: ``nn.MSELoss`` on
    ``pred[mask]`` and ``target[mask]``). pred, target: (N, L, K); mask: (N, L) bool, True where masked."""
    m = mask.to(pred.dtype).unsqueeze(-1)  # (N, L, 1)
    sq = (pred - target).pow(2) * m  # (N, L, K), zero on visible patches
    return sq.sum() / (m.sum() * pred.shape[-1])  # Sec. 3: L2 on masked patches


# --- model ----------------------------------------------------------------------------------------------


def patch_size(backbone: nn.Module) -> int:
    """The ViT's patch side, from its strided patch embedding; a one-line error for another backbone."""
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    missing = [a for a in ("pos_embed", "cls_token", "blocks", "norm") if not hasattr(backbone, a)]
    if stride is None or missing:
        raise ValueError(f"MaskFeat needs a ViT with patch tokens (--backbone vit_tiny); {type(backbone).__name__} "
                         f"has no {', '.join((['patch_embed'] if stride is None else []) + missing)}")
    return int(stride[0])


def masked_tokens(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                  mask_token: torch.Tensor | None = None, norm: bool = True) -> torch.Tensor:
    """All output tokens (N, 1 + L, D) of x (N, C, H, W), CLS first, after the ViT's final norm (``norm``);
    ``mask`` (N, L) bool replaces those patch embeddings by ``mask_token`` (1, 1, D) before the position
    embeddings are added (official ``_maskfeat_forward``: ``x * (1 - mask) + mask_token * mask``, then
    ``pos_embed``)."""
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"maskfeat: images of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; the ViT has "
                         f"position embeddings for {backbone.pos_embed.shape[0]}")
    if mask is not None:
        t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)  # (N, L, D) [MASK] in the input
    t = t + backbone.pos_embed.to(t.dtype)  # every position, masked ones included
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1).to(t.dtype), t], dim=1)  # (N, 1 + L, D)
    for blk in backbone.blocks:
        t = blk(t)
    return backbone.norm(t) if norm else t  # the head's LayerNorm


class MaskFeat(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.patch = patch_size(backbone)
        if self.patch % cfg.hog_cell:
            raise ValueError(f"MaskFeat: patches of {self.patch} px do not split into HOG cells of {cfg.hog_cell} px "
                             f"(--set hog_cell=...)")
        self.grid = math.isqrt(backbone.pos_embed.shape[0])
        if self.grid**2 != backbone.pos_embed.shape[0]:
            raise ValueError(f"MaskFeat's block masks need a square patch grid, got {backbone.pos_embed.shape[0]} patches")
        channels = backbone.patch_embed.in_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, feature_dim))  # shared [MASK] embedding
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # official trunc_normal_(std=0.02)
        self.head = nn.Linear(feature_dim, channels * cfg.hog_bins * (self.patch // cfg.hog_cell) ** 2)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # official MSSeparateHead._init_weights
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        mask = block_masking(len(x), self.grid, self.grid, self.cfg.mask_ratio, self.cfg.mask_min_aspect)
        mask = mask.to(x.device)  # (N, L)
        with torch.no_grad():  # a fixed function of the intact image
            target = hog_targets(x.float(), self.patch, self.cfg.hog_cell, self.cfg.hog_bins, self.cfg.hog_sobel)
        tokens = masked_tokens(self.backbone, x, mask, self.mask_token)  # (N, 1 + L, D)
        pred = self.head(tokens[:, 1:])  # (N, L, K) a prediction for every patch
        loss = maskfeat_loss(pred.float(), target, mask)  # only the masked ones count
        return {"loss": loss, "masked_fraction": mask.float().mean().detach()}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens of the whole image, then a LayerNorm without affine (the official
        fine-tuning model's ``USE_MEAN_POOLING`` and its freshly initialised ``norm``)."""
        t = masked_tokens(self.backbone, x, norm=False)  # (N, 1 + L, D) after the last block
        pooled = t[:, 1:].mean(dim=1)  # (N, D) without the CLS token
        return F.layer_norm(pooled, pooled.shape[-1:])


MODEL = MaskFeat


if __name__ == "__main__":
    mask = block_masking(2, 8, 8, 0.4, generator=torch.Generator().manual_seed(0))
    print(mask.view(2, 8, 8).int(), "masked per image:", mask.sum(1).tolist())
    print("HOG target of a 16-px patch:", hog_targets(torch.randn(1, 3, 32, 32), 16).shape)
