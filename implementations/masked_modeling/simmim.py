"""SimMIM — Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu. "SimMIM: A Simple Framework for Masked Image Modeling".
CVPR 2022, arXiv:2111.09886. Catalog id: ``simmim``. Official code: https://github.com/microsoft/SimMIM
(``models/simmim.py``, ``data/data_simmim.py``, ``main_simmim.py``, ``configs/vit_base__800ep/``).

The image is masked at a grid coarser than the encoder's: square mask patches of 32 px (ViT-B at 224 px:
a 7 x 7 grid over the 14 x 14 grid of 16-px ViT patches), ceil(0.6 x 49) = 30 of them drawn uniformly per
image (Sec. 3, "Masking strategy"; official ``MaskGenerator``). Unlike MAE the encoder sees the whole image:
the embedding of every masked ViT patch is replaced by one shared learnable mask token, the position
embeddings are added after that, and the ViT runs on all tokens (official ``VisionTransformerForSimMIM``).
A single linear layer, a 1x1 convolution to p*p*3 values per token followed by ``PixelShuffle(p)``, maps
the encoded patch tokens back to an image (Sec. 3, "Prediction head"). The loss is the L1 distance on the
masked pixels only (Eq. 1, "Prediction target"), normalised as the official ``SimMIM.forward``:

    L = 1 / (C (|M| + 1e-5)) sum_n sum_{(h, w) in M_n} sum_c |y_nchw - x_nchw|

with x the input as it enters the encoder (the colour-normalised crop; no per-patch normalisation), y the
prediction, M_n the masked pixel positions of image n (the mask upsampled to pixels), |M| their number over
the batch and C = 3 channels: the mean absolute error over masked pixel values, Eq. 1's 1/Omega(x_M).

Collapse: none to prevent. The target is the input itself, so a constant representation cannot make the
loss small; what the method guards against is a trivial solution by copying neighbouring pixels, and mask
patches larger than the ViT's (32 px) at a ratio of 0.6 make the masked pixels far from visible ones (the
paper's "AvgDist" analysis of the masking ablations).

Backbone: a ViT walked part by part (``masked_vit_tokens``): ``patch_embed`` a strided conv (kernel = stride
= p), ``pos_embed`` (L, D) for a square grid of ``num_patches`` patches, ``cls_token`` (1, 1, D), ``blocks``
taking (N, T, D), ``norm`` (selfsup's ``vit_tiny``: ``--backbone vit_tiny``). Another backbone gets a
one-line ValueError. The prediction head reads the patch tokens after the final norm; the CLS token is
carried through the encoder, as officially, and predicts nothing.

Features for evaluation (``embed``): the mean of the patch tokens after block round(depth x 8/12) of the
whole, unmasked image — the paper's linear probe on ViT-B (Table 6, "an intermediate layer"), which the
authors specify as the 8th of 12 blocks, average-pooled over the patch tokens without the CLS token
(microsoft/SimMIM issue #14). For selfsup's 6-block ``vit_tiny`` that is block 4.

Deviations:
- the encoder is the harness's ViT: fixed 2-D sine-cosine absolute position embeddings (the CLS token has
  none), PyTorch's default initialisation, LayerNorm eps 1e-5, no layer scale and no stochastic depth. The
  official ViT-B uses a shared relative position bias and no absolute embedding (``USE_APE: False``,
  ``USE_SHARED_RPB: True``), layer scale 0.1 (``INIT_VALUES``), drop path 0.1 and eps 1e-6. Where the
  official code adds position embeddings after the mask token, so does this file;
- schedule: the harness's linear warm-up from 0 and cosine decay to 0 per step. The official ViT-B run
  warms up from 5e-7 x batch/512 over 10 epochs and then divides the rate by 10 at epoch 700 of 800
  (``LR_SCHEDULER: multistep``, ``MULTISTEPS: [700]``); the paper's 100-epoch ablations use cosine;
- no gradient clipping: the official default ``TRAIN.CLIP_GRAD`` is 5.0 (max norm); the harness has none;
- masks are drawn inside ``forward`` on the device with torch's generator (officially a numpy permutation
  per image in the loader workers): the same distribution, every image exactly ceil(ratio x cells) cells;
- the small preset scales the mask patch to 8 px over 4-px ViT patches at 32 px (see ``PRESETS``).
Weight decay follows the official pre-training groups (``get_pretrain_param_groups``): none on biases, 1-D
parameters and the CLS token (``no_weight_decay``: pos_embed, cls_token), decay on the mask token (the
ViT variant does not exempt it) and on every weight (``param_groups``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    mask_patch_size: int = 32
    """Side of the square mask patches in pixels (official ``DATA.MASK_PATCH_SIZE: 32`` in the ViT-B and
    Swin configs; the masking ablations find 32 best at a ratio of about 0.6). A multiple of the ViT's patch
    that divides the image."""
    mask_ratio: float = 0.6
    """Share of mask patches masked per image, rounded up to whole patches (official ``DATA.MASK_RATIO``,
    ``np.ceil(token_count * mask_ratio)``)."""
    embed_block_fraction: float = 8 / 12
    """``embed`` pools the output of block round(depth x this): the paper's linear probe reads block 8 of
    ViT-B's 12 (Table 6; block and pooling from the authors in microsoft/SimMIM issue #14)."""
    crop_scale: tuple[float, float] = (0.67, 1.0)
    """Area range of the random resized crop (official ``SimMIMTransform``: scale=(0.67, 1.))."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio range of the crop (official ``SimMIMTransform``: ratio=(3/4, 4/3))."""
    optimizer: str = "adamw"
    """AdamW (official ``TRAIN.OPTIMIZER.NAME: adamw``; the paper's ablation setting, Sec. 4.1)."""
    base_lr: float = 5e-5
    """Per 256 images. The official rule is per 512 (``main_simmim.py``: lr = BASE_LR x total batch / 512)
    with ``BASE_LR: 1e-4`` for ViT-B 800 epochs, i.e. 5e-5 per 256 and 4e-4 at batch 2048. (The paper's
    Swin-B ablations: 8e-4 at batch 2048, the config's 2e-4 per 512.)"""
    weight_decay: float = 0.05
    """Official ``TRAIN.WEIGHT_DECAY: 0.05`` (and the paper's Sec. 4.1)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Official ``TRAIN.OPTIMIZER.BETAS`` (and the paper's Sec. 4.1)."""
    warmup_epochs: int = 10
    """Linear warm-up (official ViT-B config ``WARMUP_EPOCHS: 10``)."""
    epochs: int = 800
    """ViT-B pre-training length behind the 83.8% fine-tuning result (official ``EPOCHS: 800``)."""
    batch_size: int = 2048
    """The paper's batch of 2048 (Sec. 4.1, the ablation setting; the README's 16 GPUs x 128). The ViT-B
    config leaves it to the per-GPU default of 128: not verified for ViT-B beyond that."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64,
# ``--backbone vit_tiny``: 32 px, 4-px patches, an 8 x 8 patch grid):
# - mask_patch_size 8: mask patches twice the ViT's patch, as ViT-B's 32 over 16, a 4 x 4 mask grid of
#   which ceil(0.6 x 16) = 10 cells are masked; the paper's 32 px would mask the whole 32-px image;
# - base_lr 1.5e-3, warm-up 2 epochs: the paper's rate (1.25e-5 at batch 64) hardly moves the encoder in
#   330 steps, and 10 warm-up epochs would be two thirds of the run (the same change as MAE's preset).
PRESETS = {"small": dict(mask_patch_size=8, base_lr=1.5e-3, warmup_epochs=2)}


# --- augmentations (official data/data_simmim.py) -------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: random resized crop (scale 0.67-1, ratio 3/4-4/3, bilinear as torchvision's default in the
    official transform) and horizontal flip, then colour normalisation. The mask is drawn inside
    ``forward``. One v2 pipeline; it takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- masks (official MaskGenerator) ---------------------------------------------------------------


def coarse_random_masking(n: int, image_size: int, mask_patch: int, model_patch: int, ratio: float,
                          device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random masks drawn on the grid of mask patches and upsampled to the ViT's patch grid
    (official ``MaskGenerator``). Returns (N, L) bool, True where a ViT patch is masked, L = (image_size /
    model_patch)^2 in row-major order; each image has exactly ceil(cells x ratio) masked cells of the
    (image_size / mask_patch)^2, each covering (mask_patch / model_patch)^2 ViT patches. The same generator
    state gives the same masks."""
    if image_size % mask_patch or mask_patch % model_patch:
        raise ValueError(f"mask patches of {mask_patch} px must divide the {image_size}-px image and be a "
                         f"multiple of the {model_patch}-px ViT patch")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio {ratio}: must be in [0, 1]")
    side = image_size // mask_patch  # mask grid side
    cells = side * side
    n_mask = math.ceil(cells * ratio)  # as the official np.ceil(token_count * mask_ratio)
    order = torch.rand(n, cells, device=device, generator=generator).argsort(dim=1)  # (N, cells) a permutation
    coarse = torch.zeros(n, cells, dtype=torch.bool, device=device)
    coarse.scatter_(1, order[:, :n_mask], True)  # (N, cells) the first n_mask of the permutation
    scale = mask_patch // model_patch
    fine = coarse.view(n, side, side).repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (N, G, G)
    return fine.flatten(1)  # (N, L), L = G^2


# --- encoder, head and loss -----------------------------------------------------------------------


def patch_size(backbone: nn.Module) -> int:
    """The ViT's patch side, from its strided patch embedding; a one-line error for another backbone."""
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    missing = [a for a in ("pos_embed", "cls_token", "blocks", "norm", "num_patches") if not hasattr(backbone, a)]
    if stride is None or missing:
        raise ValueError(f"SimMIM needs a ViT with patch tokens (--backbone vit_tiny); {type(backbone).__name__} "
                         f"has no {', '.join((['patch_embed'] if stride is None else []) + missing)}")
    return int(stride[0])


def masked_vit_tokens(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                      mask_token: torch.Tensor | None = None, depth: int | None = None) -> torch.Tensor:
    """Tokens (N, 1 + L, D) of x (N, C, H, W), CLS first. ``mask`` (N, L) bool replaces those patch embeddings
    by ``mask_token`` (1, 1, D) before the position embeddings are added (official
    ``VisionTransformerForSimMIM.forward``). All blocks and the final norm, or, with ``depth``, the output
    of the first ``depth`` blocks without the norm (the intermediate layer of the linear probe)."""
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"simmim: images of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; the ViT has "
                         f"position embeddings for {backbone.pos_embed.shape[0]}")
    if mask is not None:
        t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)  # (N, L, D) masked patches -> token
    t = t + backbone.pos_embed.to(t.dtype)  # the mask tokens get their positions too
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1).to(t.dtype), t], dim=1)  # (N, 1 + L, D)
    for blk in backbone.blocks[:depth]:
        t = blk(t)
    return t if depth is not None else backbone.norm(t)


def simmim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean absolute error over the masked pixels (Eq. 1). pred, target: (N, C, H, W), target the input
    pixels; mask: (N, L) bool at the ViT's grid of p-px patches, True where masked. Normalised as the
    official ``SimMIM.forward``: sum over masked pixels and channels / (masked pixels + 1e-5) / C."""
    n, c, h, w = target.shape
    m = mask.view(n, h // patch, w // patch).repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # (N, H, W)
    m = m.unsqueeze(1).to(pred.dtype)  # (N, 1, H, W)
    l1 = (pred - target).abs()  # (N, C, H, W)
    return (l1 * m).sum() / (m.sum() + 1e-5) / c  # Eq. (1)


# --- model ----------------------------------------------------------------------------------------


class SimMIM(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.patch = patch_size(backbone)
        self.grid = math.isqrt(backbone.num_patches)
        self.image_size = self.grid * self.patch
        coarse_random_masking(1, self.image_size, cfg.mask_patch_size, self.patch, cfg.mask_ratio)  # checks sizes
        cells = (self.image_size // cfg.mask_patch_size) ** 2
        if math.ceil(cells * cfg.mask_ratio) >= cells:
            raise ValueError(f"simmim: mask_patch_size={cfg.mask_patch_size} with mask_ratio={cfg.mask_ratio} masks "
                             f"every patch of the {self.image_size}-px image; use smaller mask patches "
                             f"(--preset small: 8 px at 32 px)")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, feature_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # official ViT variant
        channels = backbone.patch_embed.in_channels
        # one linear layer per token to its p x p pixels (official: 1x1 conv + PixelShuffle(encoder_stride))
        self.head = nn.Sequential(nn.Conv2d(feature_dim, self.patch**2 * channels, kernel_size=1),
                                  nn.PixelShuffle(self.patch))
        self.embed_depth = max(1, round(len(backbone.blocks) * cfg.embed_block_fraction))

    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoded tokens (N, 1 + L, D) -> predicted image (N, C, H, W) from the patch tokens."""
        z = tokens[:, 1:].transpose(1, 2)  # (N, D, L) without the CLS token
        z = z.reshape(len(z), z.shape[1], self.grid, self.grid)  # (N, D, G, G)
        return self.head(z)  # (N, C, G p, G p)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        mask = coarse_random_masking(len(x), self.image_size, self.cfg.mask_patch_size, self.patch,
                                     self.cfg.mask_ratio, x.device)  # (N, L)
        tokens = masked_vit_tokens(self.backbone, x, mask, self.mask_token)  # (N, 1 + L, D)
        pred = self.predict(tokens)  # (N, C, H, W)
        loss = simmim_loss(pred.float(), x.float(), mask, self.patch)
        return {"loss": loss, "masked_fraction": mask.float().mean()}

    def param_groups(self) -> list[dict]:
        """Official pre-training groups: no weight decay on biases, 1-D parameters and the CLS token."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                skip = p.ndim <= 1 or name.endswith(".bias") or name == "backbone.cls_token"
                (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0, "lars": False}]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The mean patch token (N, D) of the whole image after block ``embed_depth`` (the paper's probe)."""
        return masked_vit_tokens(self.backbone, x, depth=self.embed_depth)[:, 1:].mean(dim=1)


MODEL = SimMIM


if __name__ == "__main__":
    mask = coarse_random_masking(2, 32, 8, 4, 0.6, generator=torch.Generator().manual_seed(0))
    print("masked ViT patches per image:", mask.sum(1).tolist(), "of", mask.shape[1])
    print(mask[0].view(8, 8).int())
