"""DINOv2 — Oquab, Darcet, Moutakanni, Vo, Szafraniec, Khalidov, Fernandez, Haziza, Massa, El-Nouby, Assran,
Ballas, Galuba, Howes, Huang, Li, Misra, Rabbat, Sharma, Synnaeve, Xu, Jegou, Mairal, Labatut, Joulin,
Bojanowski. "DINOv2: Learning Robust Visual Features without Supervision". TMLR 2024 (arXiv 2023),
arXiv:2304.07193. Catalog id: ``dinov2``.
Official code: https://github.com/facebookresearch/dinov2 (``dinov2/train/ssl_meta_arch.py``, ``dinov2/loss``,
``dinov2/data/masking.py``, ``dinov2/data/collate.py``, ``dinov2/configs/train/vitg14.yaml``).

DINO's image-level self-distillation plus iBOT's masked patch-level distillation, with Sinkhorn-Knopp
centring of the teacher and a KoLeo regulariser on the student (Sec. 4). A student (ViT backbone, a DINO head
and a separate iBOT head) and an EMA teacher of the same architecture. Two global crops and M local crops
(multi-crop); the teacher sees only the global crops, unmasked; the student sees every crop, its global crops
with a random block of patch tokens replaced by a learnable mask token (half of the global crops, each with a
mask ratio spread over [0.1, 0.5]; official ``collate_data_and_cast``). With h the DINO head on CLS tokens,
h' the iBOT head on patch tokens, tau_s = 0.1 and tau_t the teacher temperature:

    p_s = softmax(h_s(cls_s(x')) / tau_s),    p_t = SK(h_t(cls_t(x)) / tau_t)          (Sec. 4, image level)
    L_DINO = 1 / (2 (|V| - 1))  sum_{x in {x_1^g, x_2^g}}  sum_{x' in V, x' != x}  H(p_t(x), p_s(x'))
    L_iBOT = 1 / (2N)  sum_{global crops c}  1 / |M_c|  sum_{i in M_c}  H(q_t(c, i), q_s(c, i))  (patch level)
    q_s(c, i) = softmax(h'_s(patch_s(mask(c))_i) / tau_s),   q_t(c, i) = SK(h'_t(patch_t(c)_i) / tau_t)
    L_KoLeo = -(1/n) sum_i log min_{j != i} || x_i - x_j ||,  x_i = cls_s(x_i^g) / ||cls_s(x_i^g)||   (Sec. 4)
    L = L_DINO + L_iBOT + 0.1 (L_KoLeo(x_1^g) + L_KoLeo(x_2^g)),      H(a, b) = - sum_k a_k log b_k,

where M_c are the masked patch positions of crop c (an unmasked crop adds 0 and still counts in the 1/(2N),
as the official ``forward_masked`` divides by all global crops), and SK is 3 Sinkhorn-Knopp iterations over
the (global) batch that replace DINO's momentum centring (Sec. 4, SwAV's normalisation): starting from
Q = exp(scores / tau_t)^T (K, B), alternately every prototype's row is scaled to total 1/K and every sample's
column to 1/B, and the columns times B are the targets. The KoLeo term uses the student backbone's CLS tokens
(after the final norm), L2-normalised, of each global crop separately (official ``koleo_loss`` summed over the
two crops; App. B.1). The teacher gets no gradient; after every step theta_t <- lambda theta_t +
(1 - lambda) theta_s, lambda on a cosine schedule from 0.994 to 1 (App. B.1, Table 16), and tau_t warms up
linearly from 0.04 to 0.07 (official ``teacher`` config). Both heads are DINO's (3-layer MLP, GELU,
L2-normalised bottleneck, weight-normalised last layer) with separate weights ("untying head weights",
Sec. 4); their last layers are not updated during the first epoch (official ``freeze_last_layer_epochs``).

Backbones: a ViT only, with patch tokens: ``patch_embed`` (a strided conv), ``pos_embed`` (L, D) for a square
grid, ``cls_token``, ``blocks`` and ``norm`` (the harness's ``vit_tiny``: ``--backbone vit_tiny``). Other
backbones get a one-line error from ``setup`` (and from ``forward``). Global crops must be at the ViT's own
size; local crops get the position embeddings resized (dino.py's ``encode``).

Collapse: no negatives. Sinkhorn-Knopp makes the teacher's targets use every prototype equally over the
batch, which rules out the collapse onto one prototype, while the low tau_t sharpens each sample's target,
which rules out the uniform one; the slowly moving teacher does the rest, as in DINO. KoLeo pushes every
student CLS feature away from its nearest neighbour in the batch (Sec. 4, Table 3a). The logged
``teacher_entropy`` is log K for uniform targets and 0 for one-hot ones.

Distributed: the DINO and iBOT cross-entropies are per sample (the iBOT sum is divided by the rank's number
of global crops, the same on every rank), so DDP's gradient averaging gives the global batch's loss.
Sinkhorn-Knopp all-reduces the total mass, the per-prototype row sums, the sample count and the maximum
score, so its targets are those of the global batch, as in the official code. KoLeo gathers the normalised
CLS features with their gradient (``gather_with_grad``, copied from simclr.py) and scores this rank's rows
against the whole batch. The masks are drawn for the whole global batch on every rank from the same RNG
stream, and each rank keeps its own crops' masks, so that two ranks mask what one process would.

Deviations:
- the backbone is the harness's ViT (pre-norm blocks, fixed 2-D sin-cos position embeddings, MLP FFN):
  no LayerScale (1e-5, Table 16), no stochastic depth (drop rate 0.4 for ViT-g, Table 16), no SwiGLU
  (Table 17), patch 4 at 32 px instead of 14, and no register tokens (a follow-up, Darcet et al. 2024, not
  this paper's training). The mask token is the method's parameter (zero-initialised, replacing patch
  embeddings before the position embedding is added, as the official ``prepare_tokens_with_masks``);
- left out from Sec. 5 (efficiency, same objective): the memory-efficient attention (FlashAttention /
  xFormers), sequence packing of global and local crops with a block-diagonal mask, efficient stochastic
  depth, FSDP with float16 communication, fp16 training with a gradient scaler (the harness's AMP on CUDA
  instead), xFormers' fused cross-entropy, and the distillation of small models from the ViT-g (ViT-S/B/L
  are distilled in the paper; this file trains from scratch, as the paper's ViT-g and ViT-L/14 from scratch);
- left out: the LVD-142M data curation (Sec. 3; the harness's data set is used), the high-resolution
  adaptation at 518 px (Sec. 4, App. B.2), and DINO's momentum centring (the default official config's
  ``centering``, replaced by Sinkhorn-Knopp in the paper's runs: Table 1, ``vitg14.yaml``);
- the harness has no weight-decay schedule (0.04 kept, not cosine to 0.2, Table 16), no gradient clipping
  (official ``clip_grad 3.0``), decays the lr to 0 (official ``min_lr 1e-6``) and scales it linearly with
  the batch (official ``sqrt_wrt_1024``): ``base_lr`` is set so that batch 3072 gets Table 16's 3.5e-4;
  no layer-wise lr decay (``vitg14.yaml`` sets ``layerwise_decay 1.0``, i.e. none; the default config's 0.9
  is not offered); the patch embedding's lr factor 0.2 is kept (``param_groups``);
- KoLeo is computed over the global batch (gathered across ranks), not per GPU "without cross-communication"
  (App. B.1), so that the objective does not depend on how many processes share the batch; on both global
  crops as the official code does (App. B.1's text names the first global crop only);
- the masks are drawn in ``forward`` over the global batch rather than per GPU batch in the data loader, with
  the official ``MaskingGenerator`` rule vectorised over crops (one candidate block per crop per round; a
  crop stops at its patch count or after 10 failed candidates in a row, as there): the same distribution,
  other random numbers;
- Sinkhorn-Knopp subtracts the (all-reduced) maximum score before the exponential: the first normalisation
  divides the factor out, so the targets are the same, but exp cannot overflow; a prototype (or sample)
  whose every entry underflows (scores more than ~87 tau_t below the maximum) keeps weight 0 instead of
  turning every target into NaN;
- crops are resized bilinearly (antialiased), not bicubically, so that they run batched on the device; the
  blur is dropped below 64 px; the local crop side is 98/224 of the image rounded to a multiple of 8 (96 px at
  224, 16 px at 32; official 98 = 7 patches of 14);
- durations in epochs (lr warm-up, teacher-temperature warm-up, frozen last layers) use the official units of
  1,250 iterations in the Config (``OFFICIAL_EPOCH_LENGTH``) and are applied as the harness's epochs (the
  temperature warm-up as a fraction of ``epochs`` of the run's steps); the lr warm-up ramps per step.
"""

from __future__ import annotations

import copy
import dataclasses
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
    out_dim: int = 131072
    """K, prototypes of the DINO head (official ``vitg14.yaml``: ``dino.head_n_prototypes``; Table 1: "128k
    prototypes")."""
    proj_hidden_dim: int = 2048
    """Hidden width of the DINO head's 3-layer MLP (official ``dino.head_hidden_dim``, ``head_nlayers 3``)."""
    proj_dim: int = 384
    """Bottleneck of the DINO head, L2-normalised before the last layer (official ``vitg14.yaml``:
    ``dino.head_bottleneck_dim``)."""
    ibot_out_dim: int = 131072
    """Prototypes of the separate iBOT head (official ``vitg14.yaml``: ``ibot.head_n_prototypes``)."""
    ibot_proj_hidden_dim: int = 2048
    """Hidden width of the iBOT head (official ``ibot.head_hidden_dim``)."""
    ibot_proj_dim: int = 256
    """Bottleneck of the iBOT head (official ``ibot.head_bottleneck_dim``; ``vitg14.yaml`` keeps 256)."""
    use_bn_in_head: bool = False
    """BatchNorm in the heads' MLPs (official ``DINOHead(use_bn=False)``)."""
    norm_last_layer: bool = False
    """Fix the weight-normalised last layers' row norms at 1 (DINO's option); False: the official DINOv2
    ``DINOHead`` sets them to 1 and leaves them learnable."""
    student_temp: float = 0.1
    """tau_s of both losses (official ``DINOLoss`` and ``iBOTPatchLoss`` default)."""
    teacher_temp: float = 0.07
    """tau_t after its warm-up (official ``teacher.teacher_temp``)."""
    warmup_teacher_temp: float = 0.04
    """tau_t at the start of its linear warm-up (official ``teacher.warmup_teacher_temp``)."""
    warmup_teacher_temp_epochs: float = 30
    """Length of the warm-up in official epochs of 1,250 iterations (``warmup_teacher_temp_epochs``)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp iterations of the teacher's centring (Sec. 4: "for 3 iterations")."""
    momentum_teacher: float = 0.994
    """Base EMA rate lambda, raised to 1 with a cosine (App. B.1, Table 16; ``vitg14.yaml``; the default
    official config, an ImageNet-1k ViT-L/16, uses 0.992)."""
    dino_loss_weight: float = 1.0
    """Weight of L_DINO (official ``dino.loss_weight``)."""
    ibot_loss_weight: float = 1.0
    """Weight of L_iBOT (official ``ibot.loss_weight``)."""
    koleo_loss_weight: float = 0.1
    """Weight of each global crop's KoLeo term (App. B.1: 0.1; official ``dino.koleo_loss_weight``)."""
    mask_sample_probability: float = 0.5
    """Fraction of the global crops that are masked (official ``ibot.mask_sample_probability``)."""
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    """Range of the masked fraction of patches; the masked crops' ratios are spread evenly over it (official
    ``ibot.mask_ratio_min_max`` and ``collate_data_and_cast``)."""
    mask_min_patches: int = 4
    """Smallest block area in patches (official ``MaskingGenerator(min_num_patches=4)``)."""
    mask_max_fraction: float = 0.5
    """Largest block, as a fraction of the patches (official ``train.py``: ``max_num_patches=0.5 * L``)."""
    mask_min_aspect: float = 0.3
    """Block aspect ratios are log-uniform in [0.3, 1/0.3] (official ``MaskingGenerator(min_aspect=0.3)``)."""
    freeze_last_layer: float = 1
    """Epochs during which the heads' last layers get rate 0 (official ``optim.freeze_last_layer_epochs``)."""
    n_local_crops: int = 8
    """M (official ``crops.local_crops_number``)."""
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    """Area range of the global crops (official ``crops.global_crops_scale``)."""
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    """Area range of the local crops (official ``crops.local_crops_scale``)."""
    local_crop_ratio: float = 98 / 224
    """Side of a local crop over a global one (official ``vitg14.yaml``: ``local_crops_size 98`` at 224)."""
    patch_embed_lr_mult: float = 0.2
    """Learning-rate factor of the patch embedding (official ``optim.patch_embed_lr_mult``)."""
    optimizer: str = "adamw"
    """AdamW (App. B.1, Table 16)."""
    base_lr: float = 3.5e-4 * 256 / 3072
    """The harness's rate per 256 images: 3.5e-4 at batch 3072 (Table 16, ViT-g/14 from scratch; official
    ``base_lr 2e-4`` with the square-root rule)."""
    weight_decay: float = 0.04
    """Initial weight decay (Table 16: cosine from 0.04 to 0.2; kept fixed, see Deviations)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Official ``adamw_beta1``, ``adamw_beta2``."""
    warmup_epochs: int = 80
    """Linear lr warm-up: 100k iterations (Table 16), 80 official epochs (``vitg14.yaml``)."""
    epochs: int = 500
    """625k iterations (Table 16): 500 official epochs of 1,250 iterations (``vitg14.yaml``)."""
    batch_size: int = 3072
    """Table 16 (ViT-g/14 from scratch)."""
    sync_batchnorm: bool = True
    """SyncBatchNorm for the heads' BN when ``use_bn_in_head`` (the official heads and ViT have none)."""


# CPU runs on the embedded digits with --backbone vit_tiny (1,437 images of 32 px, batch 64, 15 epochs = 330
# steps; k-NN of the teacher's CLS token; the random-init vit_tiny gets 55.3%). Tried: heads of 1024
# prototypes with 256-d bottlenecks and no BN, tau_t 0.04 -> 0.07 over one epoch: the SK targets stayed
# uniform (teacher entropy 6.86 at step 60, log K = 6.93; stopped): a random ViT's CLS tokens of different
# digits are nearly parallel (cosine 0.955), and the head keeps them so (0.954 after its MLP), so the
# Sinkhorn-Knopp row scaling leaves every prototype equally likely for every image. With BN in the heads, 64-d
# bottlenecks and tau_t fixed at 0.04 (as now) the targets start at entropy 4.8 and the teacher's k-NN is
# 85.3% at step 154 (student 90.6%). Hence:
# - epochs 15: the harness's budget, so that the epoch-based durations are counted in its epochs;
# - use_bn_in_head (an official DINOHead option, off in the paper's runs): centres the heads' hidden features
#   over the batch (cosine of the bottlenecks 0.17 instead of 0.95 at initialisation), as in DINO's preset;
# - proj_dim, ibot_proj_dim 64: scores of a unit bottleneck against unit prototypes spread as 1/sqrt(dim), so
#   64 dimensions give tau_t something to sharpen from the first step (DINO's preset does the same);
# - teacher_temp 0.04, i.e. no warm-up: with 0.07 the targets start flatter (entropy 5.9 instead of 4.8);
# - out_dim, ibot_out_dim 1024, hidden 1024: 131,072 prototypes for 1,437 images would cost more than the ViT;
# - n_local_crops 4: each 16-px local crop costs a quarter of a global one;
# - momentum_teacher 0.99: with 0.994 the teacher moves little in 330 steps (DINO's and BYOL's presets do the
#   same);
# - base_lr 2e-3 (a peak lr of 5e-4 at batch 64) with warmup_epochs 1 (the paper's 80 of 500 epochs would
#   be 2.4 of 15); not tuned;
# - local_crop_scale (0.14, 0.32): 5% of an 8x8 digit upscaled to 16 px is a blob (as DINO's preset).
PRESETS = {
    "small": dict(epochs=15, use_bn_in_head=True, proj_dim=64, ibot_proj_dim=64, teacher_temp=0.04,
                  out_dim=1024, proj_hidden_dim=1024, ibot_out_dim=1024, ibot_proj_hidden_dim=1024,
                  n_local_crops=4, momentum_teacher=0.99, base_lr=2e-3, warmup_epochs=1,
                  local_crop_scale=(0.14, 0.32)),
}


# --- augmentations (DINO's multi-crop recipe; official DataAugmentationDINO) --------------------------


def local_crop_side(cfg: Config, image_size: int) -> int:
    """The local crops' side: ``local_crop_ratio`` of the image rounded to a multiple of 8, so that it splits
    into whole patches of 4 or 8 px (96 px at 224: six patches of 16; 16 px at 32: four patches of 4)."""
    return max(8, 8 * round(image_size * cfg.local_crop_ratio / 8))


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """2 + M views, each its own v2 pipeline (official ``DataAugmentationDINO``, as DINO's): the first global
    crop always blurred, the second blurred with p=0.1 and solarised with p=0.2, then M smaller local crops
    blurred with p=0.5. All share flip, colour jitter (p=0.8) and grayscale (p=0.2). Each takes a PIL image
    or a uint8 tensor. The masks are drawn in ``forward``, on the patch grid."""

    def make(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:  # sigma 0.1-2 px (official: PIL radius), kernel 10% of the crop's side
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # on uint8 values, before ToDtype
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    local = local_crop_side(cfg, image_size)
    first = make(image_size, cfg.global_crop_scale, 1.0, 0.0)
    second = make(image_size, cfg.global_crop_scale, 0.1, 0.2)
    return [first, second] + [make(local, cfg.local_crop_scale, 0.5, 0.0) for _ in range(cfg.n_local_crops)]


# --- the ViT's tokens, with and without masks ---------------------------------------------------------

VIT_PARTS = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm")


def require_vit(backbone: nn.Module) -> None:
    """A one-line error unless the backbone is a ViT with patch tokens (the attributes of ``VIT_PARTS``)."""
    missing = [a for a in VIT_PARTS if getattr(backbone, a, None) is None]
    if missing:
        raise ValueError(f"the backbone must be a ViT with patch tokens (--backbone vit_tiny); "
                         f"{type(backbone).__name__} has no {', '.join(missing)}")


def vit_tokens(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """All output tokens (N, 1 + L, D) of x (N, C, H, W) at the ViT's own size, CLS first; ``mask`` (N, L)
    bool replaces those patch embeddings by ``mask_token`` (1, D) before the position embedding is added
    (official ``prepare_tokens_with_masks``)."""
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"dinov2: global crops of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; "
                         f"the ViT has position embeddings for {backbone.pos_embed.shape[0]}")
    if mask is not None:
        t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)  # (N, L, D)
    t = t + backbone.pos_embed.to(t.dtype)
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1).to(t.dtype), t], dim=1)  # (N, 1 + L, D)
    for blk in backbone.blocks:
        t = blk(t)
    return backbone.norm(t)


# copied from dino.py, which the lead keeps identical (local crops: resized position embeddings)
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


# --- masks (official MaskingGenerator and collate_data_and_cast) ----------------------------------------


def mask_counts(n_crops: int, num_patches: int, probability: float,
                ratio: tuple[float, float]) -> torch.Tensor:
    """Patches to mask in each of n_crops crops (n_crops,): int(n_crops * probability) of them, in random
    positions, get ratios spread over ``ratio`` (one uniform draw in each of as many equal bins), the
    others 0. Global RNG, on the CPU."""
    n_masked = int(n_crops * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked + 1)
    r = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(n_masked)  # (n_masked,)
    counts = torch.zeros(n_crops, dtype=torch.long)
    counts[torch.randperm(n_crops)[:n_masked]] = (num_patches * r).long()  # random.shuffle of the masks
    return counts


def block_masks(counts: torch.Tensor, h: int, w: int, min_patches: int, max_patches: float,
                min_aspect: float) -> torch.Tensor:
    """Block-wise masks (B, h, w) bool with about counts[b] patches each (official ``MaskingGenerator``): a
    candidate rectangle of area U(min_patches, budget) and log-uniform aspect ratio is accepted if it fits
    strictly inside the grid and adds between 1 and ``budget`` new patches (budget = the rest of the count,
    at most ``max_patches``); a crop stops at its count or after 10 rejected candidates in a row. One
    candidate per crop per round, all crops at once. Global RNG, on the CPU."""
    b = len(counts)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    done = torch.zeros(b, dtype=torch.long)  # patches masked so far
    fails = torch.zeros(b, dtype=torch.long)  # rejected candidates in a row
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    active = counts > 0
    while active.any():
        u = torch.rand(5, b, dtype=torch.float64)
        budget = (counts - done).double().clamp(max=max_patches)  # (B,)
        area = min_patches + (budget - min_patches) * u[0]  # random.uniform(min, budget)
        aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
        bh = torch.round(torch.sqrt(area * aspect)).long()  # (B,) half to even, as Python's round
        bw = torch.round(torch.sqrt(area / aspect)).long()
        fits = (bw < w) & (bh < h)
        top = (u[2] * (h - bh + 1)).long().clamp(0, h - 1)  # random.randint(0, h - bh)
        left = (u[3] * (w - bw + 1)).long().clamp(0, w - 1)
        block = ((rows >= top.view(b, 1, 1)) & (rows < (top + bh).view(b, 1, 1))
                 & (cols >= left.view(b, 1, 1)) & (cols < (left + bw).view(b, 1, 1)))  # (B, h, w)
        new = (block & ~mask).sum(dim=(1, 2))  # (B,)
        accept = active & fits & (new > 0) & (new <= budget)
        mask |= block & accept.view(b, 1, 1)
        done += torch.where(accept, new, 0)
        fails = torch.where(accept, 0, fails + active.long())
        active = (done < counts) & (fails < 10)
    return mask


# --- heads --------------------------------------------------------------------------------------------


# copied from dino.py, which the lead keeps identical; DINOv2 builds both heads with it (Sec. 4: separate
# weights), the iBOT head from the ibot_* fields
class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> L2 normalisation -> weight-normalised linear layer to K, no bias (Sec. 3.1;
    official ``DINOHead``: truncated-normal init with std 0.02 for the MLP, the rows' norms g set to 1)."""

    def __init__(self, in_dim: int, cfg: Config):
        super().__init__()
        hidden = cfg.proj_hidden_dim
        norm = (lambda: nn.BatchNorm1d(hidden)) if cfg.use_bn_in_head else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(), nn.GELU(),
            nn.Linear(hidden, cfg.proj_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        linear = nn.Linear(cfg.proj_dim, cfg.out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(linear)  # W = g v / ||v||, per row
        norms = self.last_layer.parametrizations.weight.original0  # g, (K, 1)
        with torch.no_grad():
            norms.fill_(1.0)
        norms.requires_grad_(not cfg.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # (N, proj_dim)
        return self.last_layer(z)  # (N, K)


def ibot_head_config(cfg: Config) -> Config:
    """The Config that builds the iBOT head with ``DINOHead``: its own prototypes, width and bottleneck."""
    return dataclasses.replace(cfg, out_dim=cfg.ibot_out_dim, proj_hidden_dim=cfg.ibot_proj_hidden_dim,
                               proj_dim=cfg.ibot_proj_dim)


# --- losses, centring and schedules -------------------------------------------------------------------


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (half precision under AMP is widened; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float | torch.Tensor,
                   n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets (B, K) from scores (B, K), each row a distribution (Sec. 4; SwAV's normalisation,
    official ``sinkhorn_knopp_teacher``): Q = exp(scores / tau)^T scaled to total mass 1, then n times every
    prototype's row to 1/K and every sample's column to 1/B; returns B Q^T. Under torch.distributed the batch
    is the global one: the total, the row sums, the count B and the maximum are all-reduced."""
    scores = _wide(scores)
    top = scores.max() if scores.numel() else scores.new_tensor(-math.inf)
    top = _all_reduce(top.clone(), dist.ReduceOp.MAX)
    q = torch.exp((scores - top) / temperature).T  # (K, B); the factor exp(-top / tau) cancels below
    n = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))  # B, the global count
    k = q.shape[0]
    tiny = torch.finfo(q.dtype).tiny  # a row or column that underflowed entirely stays 0 instead of NaN
    q = q / _all_reduce(q.sum())
    for _ in range(n_iterations):
        q = q / _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny) / k  # each prototype: total 1/K
        q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / n  # each sample: total weight 1/B
    return (q * n).T  # (B, K), rows sum to 1


def dino_cross_entropy(student_out: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor],
                       student_temp: float) -> torch.Tensor:
    """L_DINO averaged over its pairs and the batch. student_out: V x (N, K) scores of every view, the global
    views first in the teacher's order; teacher_probs: G x (N, K) targets of the global views (rows sum to
    1, no gradient). Pairs (teacher view i, student view v) with v != i (DINO's Eq. 3)."""
    log_p_s = [F.log_softmax(_wide(s) / student_temp, dim=-1) for s in student_out]  # V x (N, K)
    total, pairs = 0.0, 0
    for i, q in enumerate(teacher_probs):
        for v, lp in enumerate(log_p_s):
            if v != i:  # the same view on both sides is skipped
                total = total + (-(q.detach() * lp).sum(dim=-1)).mean()  # H(p_t, p_s)
                pairs += 1
    return total / pairs


def ibot_loss(student_out: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """L_iBOT: student_out (P, K) scores and teacher_probs (P, K) targets of the P masked patches, in the
    row-major order of masks (B, L) bool (on any device: the CPU avoids a sync); each crop's patches are
    averaged, and the sum over crops is divided by all B crops, masked or not (``forward_masked``)."""
    log_q_s = F.log_softmax(_wide(student_out) / student_temp, dim=-1)  # (P, K)
    h = -(teacher_probs.detach() * log_q_s).sum(dim=-1)  # (P,) H(q_t, q_s)
    per_crop = (1 / masks.sum(dim=1).clamp(min=1).double()).unsqueeze(1).expand_as(masks)[masks]  # 1/|M_c|
    return (h * per_crop.to(h.device, h.dtype)).sum() / masks.shape[0]


# copied from simclr.py, which the contract test keeps identical
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


# copied from simclr.py, which the contract test keeps identical
def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(concatenation of x over ranks, offset of this rank's rows); x itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(_GatherWithGrad.apply(x)), dist.get_rank() * x.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_KoLeo = -(1/n) sum_i log min_{j != i} ||x_i - x_j|| of the L2-normalised rows of x (N, D) (Sec. 4;
    official ``KoLeoLoss``: the neighbour by the largest inner product, eps 1e-8). Under torch.distributed
    the neighbours come from the global batch and this rank's rows are averaged."""
    x = F.normalize(_wide(x), dim=-1, eps=eps)  # (N, D)
    everyone, offset = gather_with_grad(x)  # (N_global, D)
    with torch.no_grad():
        dots = x @ everyone.T  # (N, N_global)
        rows = torch.arange(len(x), device=x.device)
        dots[rows, rows + offset] = -math.inf  # j != i
        nearest = dots.argmax(dim=1)  # (N,)
    d = F.pairwise_distance(x, everyone[nearest], eps=eps)  # (N,)
    return -torch.log(d + eps).mean()


# copied from dino.py, which the lead keeps identical ("Sec. 3.2" there is DINO's)
def teacher_temperature(step: int, total_steps: int, cfg: Config) -> float:
    """tau_t: linear from warmup_teacher_temp to teacher_temp over the warm-up, then constant (Sec. 3.2)."""
    warmup = cfg.warmup_teacher_temp_epochs / cfg.epochs * total_steps
    if step >= warmup:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup


# copied from byol.py, which the contract test keeps identical ("Sec. 3.2" there is BYOL's)
def ema_rate(step: int, total_steps: int, tau_base: float) -> float:
    """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (Sec. 3.2)."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


# copied from dino.py, which the lead keeps identical
@torch.no_grad()
def ema_update_parameters(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- lambda theta_t + (1 - lambda) theta_s, parameters only (official code): the teacher's BN
    statistics are its own, from its forward passes on the global crops; the student's also come from the
    local crops, at another resolution."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - momentum)


# --- model --------------------------------------------------------------------------------------------


class DINOv2(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.student = nn.ModuleDict({
            "backbone": backbone,
            "dino_head": DINOHead(feature_dim, cfg),
            "ibot_head": DINOHead(feature_dim, ibot_head_config(cfg)),  # untied from the DINO head (Sec. 4)
        })
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)  # same initial weights
        self.mask_token = nn.Parameter(torch.zeros(1, feature_dim))  # official: zeros, in the student ViT
        # the step-dependent state of the next forward, a buffer so that a resumed run continues exactly
        self.register_buffer("teacher_temp", torch.tensor(float(cfg.warmup_teacher_temp)))
        self.momentum = cfg.momentum_teacher

    @property
    def backbone(self) -> nn.Module:
        return self.student["backbone"]

    def setup(self, num_samples: int, num_classes: int) -> None:
        require_vit(self.backbone)  # the harness turns this into a one-line error

    def param_groups(self) -> list[dict]:
        """No weight decay on biases and norm parameters (ndim <= 1, as the harness's default groups); the
        heads' last layers at rate 0 for the first ``freeze_last_layer`` epochs (official last-layer lr
        schedule); the patch embedding at ``patch_embed_lr_mult`` times the rate (official
        ``get_params_groups_with_decay``)."""
        groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = (p.ndim > 1, ".last_layer." in name, ".patch_embed." in name)
                groups.setdefault(key, []).append(p)
        out = []
        for (decay, last, patch), params in groups.items():
            g = {"params": params, "weight_decay": self.cfg.weight_decay if decay else 0.0}
            if last:
                g["frozen_epochs"] = self.cfg.freeze_last_layer
            if patch:
                g["lr_scale"] = self.cfg.patch_embed_lr_mult
            out.append(g)
        return out

    @torch.no_grad()
    def draw_masks(self, n_views: int, n: int, num_patches: int) -> torch.Tensor:
        """Masks (n_views * n, L) bool on the CPU of this rank's global crops (views stacked as in
        ``torch.cat``), drawn for the global batch of every rank so that each rank keeps what one process
        would draw."""
        cfg = self.cfg
        world = dist.get_world_size() if _distributed() else 1
        rank = dist.get_rank() if _distributed() else 0
        side = math.isqrt(num_patches)
        counts = mask_counts(n_views * n * world, num_patches, cfg.mask_sample_probability, cfg.mask_ratio)
        masks = block_masks(counts, side, side, cfg.mask_min_patches, cfg.mask_max_fraction * num_patches,
                            cfg.mask_min_aspect)  # (V n world, side, side)
        masks = masks.view(n_views, n * world, num_patches)[:, rank * n : (rank + 1) * n]  # this rank's crops
        return masks.reshape(n_views * n, num_patches)

    def forward(self, batch: dict) -> dict:
        cfg, student, teacher = self.cfg, self.student, self.teacher
        require_vit(student["backbone"])
        views = batch["views"]  # 2 global (N, C, H, W), then M local (N, C, h, w)
        n = len(views[0])
        x = torch.cat(views[:2])  # (2N, C, H, W)
        masks = self.draw_masks(2, n, student["backbone"].pos_embed.shape[0])  # (2N, L) on the CPU
        picked = masks.flatten().nonzero().squeeze(1).to(x.device)  # (P,) masked patches, row-major

        with torch.no_grad():  # the teacher sees the global crops, unmasked
            t_tokens = vit_tokens(teacher["backbone"], x)  # (2N, 1 + L, D)
            t_cls = teacher["dino_head"](t_tokens[:, 0])  # (2N, K)
            t_patch = teacher["ibot_head"](t_tokens[:, 1:].flatten(0, 1).index_select(0, picked))  # (P, K')
            p_cls = sinkhorn_knopp(t_cls, self.teacher_temp, cfg.sinkhorn_iterations)  # (2N, K), jointly
            p_patch = sinkhorn_knopp(t_patch, self.teacher_temp, cfg.sinkhorn_iterations)  # (P, K')

        s_tokens = vit_tokens(student["backbone"], x, masks.to(x.device), self.mask_token)  # (2N, 1 + L, D)
        s_cls = s_tokens[:, 0]  # (2N, D), masked crops' CLS tokens (official too)
        feats, start = [s_cls], 2
        while start < len(views):  # one backbone call per run of local crops of one size
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(encode(student["backbone"], torch.cat(list(views[start:end]))))  # (k N, D)
            start = end
        student_out = student["dino_head"](torch.cat(feats)).split(n)  # V x (N, K)
        s_patch = student["ibot_head"](s_tokens[:, 1:].flatten(0, 1).index_select(0, picked))  # (P, K')

        l_dino = dino_cross_entropy(student_out, p_cls.chunk(2), cfg.student_temp)
        l_ibot = ibot_loss(s_patch, p_patch, masks, cfg.student_temp)
        l_koleo = sum(koleo_loss(c) for c in s_cls.chunk(2))  # each global crop on its own (official)
        loss = cfg.dino_loss_weight * l_dino + cfg.ibot_loss_weight * l_ibot + cfg.koleo_loss_weight * l_koleo
        with torch.no_grad():
            entropy = -(p_cls * p_cls.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return {"loss": loss, "dino_loss": l_dino.detach(), "ibot_loss": l_ibot.detach(),
                "koleo_loss": l_koleo.detach(), "teacher_entropy": entropy, "teacher_temp": self.teacher_temp,
                "masked_fraction": masks.float().mean(), "momentum": torch.tensor(self.momentum)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the teacher follows the student and the schedules move to the next step
        (official ``update_teacher``). ``step`` counts finished steps."""
        self.momentum = ema_rate(step, total_steps, self.cfg.momentum_teacher)
        ema_update_parameters(self.teacher, self.student, self.momentum)
        self.teacher_temp.fill_(teacher_temperature(step, total_steps, self.cfg))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher backbone's CLS token: the official evaluation uses the teacher's weights
        (``do_test`` saves the teacher) and the CLS token is what the DINO loss trains."""
        return encode(self.teacher["backbone"], x)


MODEL = DINOv2


if __name__ == "__main__":
    torch.manual_seed(0)
    scores = torch.randn(16, 32)
    q = sinkhorn_knopp(scores, 0.07)
    print("SK rows sum to", q.sum(1)[:3].tolist(), "prototype mass x K:", (q.mean(0) * 32)[:3].tolist())
    print("KoLeo of 16 random unit vectors:", koleo_loss(torch.randn(16, 8)).item())
    print("block masks:\n", block_masks(torch.tensor([20]), 8, 8, 4, 32, 0.3)[0].int())
