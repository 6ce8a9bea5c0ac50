"""I-JEPA — Assran, Duval, Misra, Bojanowski, Vincent, Rabbat, LeCun, Ballas. "Self-Supervised Learning from
Images with a Joint-Embedding Predictive Architecture". CVPR 2023, arXiv:2301.08243. Catalog id: ``i-jepa``.
Official code: https://github.com/facebookresearch/ijepa (``src/train.py``, ``src/masks/multiblock.py``,
``src/models/vision_transformer.py``, ``src/helper.py``, ``configs/in1k_vith14_ep300.yaml``).

From one context block of an image, predict the representations of M target blocks of the same image
(Sec. 3). Per image: M = 4 target blocks B_1..B_M (scale 0.15-0.2 of the patches, aspect ratio 0.75-1.5) and
one context block B_x (scale 0.85-1, square), from which every patch of a target block is removed. The
target encoder f_theta_bar, an EMA of the context encoder f_theta, encodes the whole image; its output tokens
are layer-normalised (no affine) and only then are the target blocks' tokens picked out (Sec. 3, "Targets":
masking the output, not the input). The context encoder encodes only the context patches. A narrow
Transformer predictor g_phi gets the context tokens plus, per target block, a shared learned mask token plus
the sin-cos position embedding of each target patch, and predicts that block's representations:

    s_y = LN(f_theta_bar(y))   (N, L, D),        s_x = f_theta({y_j}_{j in B_x})   (N, |B_x|, D)
    s_hat_y(i) = g_phi(s_x, {m + p_j}_{j in B_i}),     i = 1..M
    L = 1/(N M |B| D) sum_n sum_i sum_{j in B_i} || s_hat_y(i)_j - s_y_j ||_2^2                  (Eq. 1)

Eq. (1) is (1/M) sum_i sum_{j in B_i} ||.||^2 per image; the code averages it over the batch and divides by
|B| D as well (a constant factor: every block of a batch has the same |B|), as the official ``F.*_loss``
mean reduction does. The official code uses ``F.smooth_l1_loss`` (beta 1) in place of the paper's squared
L2; ``loss="smooth_l1"`` selects it. After every step theta_bar <- m theta_bar + (1 - m) theta, with m
rising linearly from 0.996 to 1 over training (App. A.1; official ``momentum_scheduler``). No pixels are
reconstructed.

Masks (``multiblock_masks``, official ``MaskCollator``): the block sizes are drawn once per batch (App. A.1:
"we restrict the size of all context masks ... to be identical", likewise the targets), the positions per
image. A size: scale s ~ U(scale), aspect a ~ U(aspect), ``max_keep = int(L s)``, h = round(sqrt(max_keep
a)), w = round(sqrt(max_keep / a)), each cut to at most grid - 1. The context block is intersected with the
complements of the M target blocks and redrawn until it keeps more than ``min_keep`` patches; after every
20 failed draws one more target block (the last first) stops constraining it (official ``tries``). The
contexts of a batch are then cut to the smallest one's count, each keeping its first patches in row-major
order (the official collator's ``cm[:min_keep_enc]``); the target blocks all have h * w patches already.

Collapse: no negatives and no batch statistics. What keeps the constant solution away is the asymmetry of
BYOL and data2vec: the targets come from a slowly moving EMA encoder through a stop-gradient, and only the
context branch has a predictor (Sec. 2 and 3: "we leverage an asymmetric architecture ... to avoid
representation collapse"; the paper finds the EMA essential).

Backbone: a ViT with patch tokens (``--backbone vit_tiny``): ``patch_embed`` (a strided conv), ``pos_embed``
(L, D) fixed sin-cos for a square grid, ``blocks`` (pre-norm, (N, T, D) -> (N, T, D)), ``norm``, and the
method walks these parts itself (``vit_patch_tokens``). The official ViT has no [cls] token (App. A.1: "I-JEPA
is pretrained without a [cls] token"), so the harness ViT's ``cls_token`` is left out of every forward pass
and frozen (``requires_grad`` False, so that DDP finds no unused parameter). Another backbone gets a one-line
ValueError.

Features for evaluation (``embed``): the target encoder's output tokens of the whole image, average-pooled
over the patches (App. A.1: "We use the target-encoder for evaluation and average pool its output"; the
linear probes of App. A.2 use the average-pooled patch representation of the last layer).

Distributed: every term is per sample (its own patches, a per-token layer norm), so DDP's gradient averaging
is all it needs; the masks are drawn per rank, as the official collator draws them per GPU batch.

Deviations:
- the encoder is the harness's ViT with its own initialisation (PyTorch's defaults) and patch 4 at 32 px;
  the official initialises every Linear with a truncated normal (std 0.02). The predictor follows the official
  initialisation (truncated normal 0.02, zero biases; ``init_model`` re-initialises every Linear after
  ``fix_init_weight``, so no depth rescaling is left);
- the predictor's blocks are PyTorch's pre-norm ``nn.TransformerEncoderLayer`` (GELU MLP of ratio 4, qkv bias,
  no dropout, LayerNorm eps 1e-6), the same computation as the official ``Block``;
- mask placements are uniform over every position where the block fits (top in [0, grid - h]); the official
  ``torch.randint(0, grid - h)`` leaves out the last one, so that its blocks never touch the bottom row or the
  right column (and its 15 x 15 context block of a 16 x 16 grid is always at the top left);
- the block scale and aspect ratio are two independent draws; the official ``_sample_block_size`` uses one
  uniform number for both, so that larger blocks are always the taller ones;
- a target-block size that cannot exceed ``min_keep`` is refused with an error at construction (the official
  sampler would retry forever);
- the masks are drawn in ``forward`` (on the CPU, global RNG), not in the loader's collate function;
- the harness has no weight-decay schedule: 0.04 is kept throughout (official cosine 0.04 -> 0.4, App. A.1
  "linearly increased"); its lr warms up from 0, not from 1e-4 (official ``start_lr`` 2e-4), and decays to 0,
  not 1e-6; biases and norm parameters get no weight decay, as in the official ``init_opt``;
- no bfloat16 autocast of its own (the harness's AMP on CUDA instead).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    num_targets: int = 4
    """M, target blocks per image (Sec. 3, "Targets"; official ``mask.num_pred_masks 4``)."""
    target_scale: tuple[float, float] = (0.15, 0.2)
    """Area range of a target block as a fraction of the patches (Sec. 3; App. A.1; ``pred_mask_scale``)."""
    target_aspect: tuple[float, float] = (0.75, 1.5)
    """Aspect-ratio (height / width) range of a target block (Sec. 3; official ``mask.aspect_ratio``)."""
    context_scale: tuple[float, float] = (0.85, 1.0)
    """Area range of the square context block before the target patches are removed (Sec. 3, "Context";
    official ``enc_mask_scale``)."""
    min_keep: int = 10
    """A block is kept only with more than this many patches (official ``mask.min_keep 10`` and the
    ``len(mask) > self.min_keep`` test of ``_sample_block_mask``)."""
    pred_dim: int = 384
    """Predictor width (App. A.1: "we fix the embedding dimension of the predictor to 384"; ``pred_emb_dim``)."""
    pred_depth: int = 12
    """Predictor blocks (App. A.1: 12 for ViT-L/16 and ViT-H/14, 6 for ViT-B/16; official ``pred_depth``)."""
    pred_heads: int = 0
    """Predictor attention heads; 0 takes the encoder's (App. A.1: "keeping the number of self-attention heads
    equal to that of the backbone context-encoder": 16 for ViT-H)."""
    loss: str = "mse"
    """``mse``: the paper's squared L2 (Sec. 3, Eq. 1); ``smooth_l1``: the official ``F.smooth_l1_loss``."""
    ema_start: float = 0.996
    """EMA momentum of the target encoder at the start (App. A.1; official ``optimization.ema[0]``)."""
    ema_end: float = 1.0
    """...raised linearly to this value over training (App. A.1; official ``optimization.ema[1]``)."""
    crop_scale: tuple[float, float] = (0.3, 1.0)
    """Area range of the random resized crop, the only augmentation (official ``data.crop_scale``; no flip,
    colour or blur: ``use_horizontal_flip``, ``use_color_distortion``, ``use_gaussian_blur`` all false)."""
    optimizer: str = "adamw"
    """AdamW (App. A.1)."""
    base_lr: float = 1e-3 * 256 / 2048
    """lr = base_lr x batch / 256: the peak 1e-3 at batch 2048 (App. A.1; official ``lr 0.001``), cosine decay."""
    weight_decay: float = 0.04
    """The initial weight decay (App. A.1: 0.04 -> 0.4 over training; kept fixed, see Deviations)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """PyTorch's AdamW defaults (official ``torch.optim.AdamW(param_groups)``; the paper names none)."""
    warmup_epochs: int = 15
    """Linear lr warm-up (App. A.1: "during the first 15 epochs"; the official ViT-H/14 config has ``warmup
    40`` from ``start_lr`` 2e-4)."""
    epochs: int = 300
    """ViT-H/14 on ImageNet-1K (Table 1; official ``in1k_vith14_ep300.yaml``)."""
    batch_size: int = 2048
    """App. A.1 ("our default batch-size is 2048"; official 128 per GPU on 16 GPUs)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 15 epochs = 330 steps at
# batch 64, ``--backbone vit_tiny``: 192 wide, 6 blocks, 3 heads; 32 px, 4 px patches, an 8 x 8 grid):
# - min_keep 4 (the official collator's default): a target block of 0.15-0.2 of 64 patches has 9-12, and the
#   paper's 10 (of 256 patches at 224 px with patch 14) would refuse the 3 x 3 ones;
# - predictor 96 wide, 3 blocks: the paper's ViT-B/16 ratio (384 of 768 wide, 6 of 12 blocks) on vit_tiny;
#   the paper's 384 x 12 predictor would be twice as wide as the encoder it trains;
# - base_lr 2e-3 (a peak of 5e-4 at batch 64) and warm-up 1 epoch (15 of 300 is 5%): 330 steps at the
#   paper's rate (3.1e-5 after the batch scaling) hardly move the encoder;
# - ema_start 0.999 (to 1): with the paper's 0.996 the loss fell to 0.05 and the representation collapsed
#   towards position-only tokens (RankMe 1.5 against 3.1 at random init; k-NN 51.7% against 51.9%, linear
#   94.2% against 97.2%). With 0.999: k-NN 54.4%, linear 97.5% (loss 0.21, RankMe 2.9). Also tried, instead:
#   base_lr 5e-4 with 0.996: k-NN 55.6%, linear 96.9% (loss 0.17, RankMe 2.2).
PRESETS = {"small": dict(min_keep=4, pred_dim=96, pred_depth=3, base_lr=2e-3, warmup_epochs=1, ema_start=0.999)}


# --- augmentations (official src/transforms.py) ----------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: a random resized crop (scale 0.3-1, bilinear as torchvision's default there) and nothing
    else: no flip, no colour, no blur (official ``make_transforms`` with the ViT-H/14 config). The masks are
    drawn inside ``forward``. One v2 pipeline; it takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(cfg.crop_scale), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- masks (official src/masks/multiblock.py) --------------------------------------------------------


def block_size(grid: int, scale: tuple[float, float], aspect: tuple[float, float], u_scale: float,
               u_aspect: float) -> tuple[int, int]:
    """(h, w) of a block on a grid x grid patch grid from two uniform numbers in [0, 1): area fraction
    s = lo + u (hi - lo), max_keep = int(L s), aspect a likewise, h = round(sqrt(max_keep a)),
    w = round(sqrt(max_keep / a)), each at most grid - 1 (official ``_sample_block_size``)."""
    s = scale[0] + u_scale * (scale[1] - scale[0])
    max_keep = int(grid * grid * s)
    a = aspect[0] + u_aspect * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(max_keep * a)), round(math.sqrt(max_keep / a))
    return min(h, grid - 1), min(w, grid - 1)


def smallest_target_block(cfg: Config, grid: int, n: int = 33) -> int:
    """The fewest patches a target block can get (h * w over an n x n lattice of the two uniform numbers,
    ends included)."""
    us = [min(i / (n - 1), 1 - 1e-12) for i in range(n)]
    return min(math.prod(block_size(grid, cfg.target_scale, cfg.target_aspect, a, b)) for a in us for b in us)


def _rectangles(top: torch.Tensor, left: torch.Tensor, h: int, w: int, grid: int) -> torch.Tensor:
    """Boolean masks (..., grid, grid) of the h x w blocks at (top, left) (...)."""
    rows = torch.arange(grid).view(grid, 1)
    cols = torch.arange(grid).view(1, grid)
    t, lft = top[..., None, None], left[..., None, None]
    return (rows >= t) & (rows < t + h) & (cols >= lft) & (cols < lft + w)


def sample_masks(n: int, grid: int, num_targets: int = 4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), min_keep: int = 10, generator: torch.Generator | None = None,
                 timeout: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The multi-block masks of a batch of n images on a grid x grid patch grid, before the contexts are cut
    to a common count. Returns ``context`` (N, L) bool, True on the context patches (the context block less
    the target blocks it is constrained by, more than ``min_keep`` of them), and ``targets`` (M, N, K) long,
    the patch indices of each target block in row-major order, K = h * w for every block of the batch.
    One block size per batch for the targets and one for the context, positions per image; CPU, seeded by
    ``generator`` (the global RNG when None)."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    th, tw = block_size(grid, target_scale, target_aspect, u[0], u[1])
    ch, cw = block_size(grid, context_scale, (1.0, 1.0), u[2], u[3])
    if th * tw <= min_keep or ch * cw <= min_keep:
        raise ValueError(f"blocks of {th}x{tw} (targets) and {ch}x{cw} (context) patches on a {grid}x{grid} grid must "
                         f"exceed min_keep = {min_keep}; lower min_keep or use more patches")
    m = num_targets
    # target blocks: uniform positions where they fit, per image and block
    top = torch.randint(0, grid - th + 1, (n, m), generator=generator)  # (N, M)
    left = torch.randint(0, grid - tw + 1, (n, m), generator=generator)
    r, c = torch.arange(th).view(th, 1), torch.arange(tw).view(1, tw)
    targets = (top[..., None, None] + r) * grid + left[..., None, None] + c  # (N, M, h, w) row-major indices
    targets = targets.reshape(n, m, th * tw).transpose(0, 1).contiguous()  # (M, N, K)
    # allowed[:, k]: outside the first k target blocks (k = 0..M); the context starts constrained by all M
    outside = ~_rectangles(top, left, th, tw, grid)  # (N, M, g, g)
    allowed = torch.ones(n, m + 1, grid, grid, dtype=torch.bool)
    for k in range(m):
        allowed[:, k + 1] = allowed[:, k] & outside[:, k]
    context = torch.zeros(n, grid, grid, dtype=torch.bool)
    pending = torch.ones(n, dtype=torch.bool)
    tries = torch.zeros(n, dtype=torch.long)  # target blocks released from the constraint
    fails = torch.zeros(n, dtype=torch.long)  # failed draws since the last release
    while pending.any():
        ct = torch.randint(0, grid - ch + 1, (n,), generator=generator)
        cl = torch.randint(0, grid - cw + 1, (n,), generator=generator)
        level = (m - tries).clamp(min=0)  # (N,) how many target blocks still constrain the context
        candidate = _rectangles(ct, cl, ch, cw, grid) & allowed[torch.arange(n), level]  # (N, g, g)
        ok = pending & (candidate.flatten(1).sum(1) > min_keep)
        context[ok] = candidate[ok]
        fails = torch.where(pending & ~ok, fails + 1, fails)
        release = fails >= timeout  # official: after 20 failures, one target block fewer constrains it
        tries, fails = tries + release.long(), torch.where(release, 0, fails)
        pending &= ~ok
    return context.flatten(1), targets


def keep_indices(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) bool -> (N, L_min) long: each row's True positions in increasing order, cut to the smallest
    row's count (official ``cm[:min_keep_enc]``: the same number of context patches for the whole batch)."""
    count = int(mask.sum(1).min())
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # True positions first, in order
    return order[:, :count]


def multiblock_masks(n: int, grid: int, cfg: Config, generator: torch.Generator | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's ``context`` (N, L_ctx) and ``targets`` (M, N, K) patch indices (official ``MaskCollator``
    with ``allow_overlap=False``): ``sample_masks`` then ``keep_indices``."""
    context, targets = sample_masks(n, grid, cfg.num_targets, cfg.target_scale, cfg.target_aspect,
                                    cfg.context_scale, cfg.min_keep, generator)
    return keep_indices(context), targets


# copied verbatim from mae.py (a contract test keeps the copies identical)
def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (L, D) of a grid x grid patch grid, L = grid^2, row-major:
    half the channels encode the column, half the row, each as sin and cos of 10000^(-k/(D/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    x, y = xs.flatten()[:, None] * omega, ys.flatten()[:, None] * omega  # (L, D/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()  # (L, D)


# --- the ViT's patch tokens, without a CLS token -----------------------------------------------------------

VIT_PARTS = ("patch_embed", "pos_embed", "blocks", "norm")


def require_vit(backbone: nn.Module) -> int:
    """The side of the ViT's square patch grid; a one-line error for a backbone without patch tokens."""
    missing = [a for a in VIT_PARTS if getattr(backbone, a, None) is None]
    if missing:
        raise ValueError(f"I-JEPA needs a ViT with patch tokens (--backbone vit_tiny); {type(backbone).__name__} "
                         f"has no {', '.join(missing)}")
    grid = math.isqrt(backbone.pos_embed.shape[0])
    if grid * grid != backbone.pos_embed.shape[0]:
        raise ValueError(f"I-JEPA's block masks need a square patch grid, got {backbone.pos_embed.shape[0]} patches")
    return grid


def vit_patch_tokens(backbone: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Output tokens (N, L', D) of x (N, C, H, W) after the final norm, no CLS token (the official ViT has
    none): position embeddings added, then only the patches in ``keep`` (N, L') encoded (all when None)."""
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"i-jepa: images of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; the ViT has "
                         f"position embeddings for {backbone.pos_embed.shape[0]}")
    t = t + backbone.pos_embed.to(t.dtype)
    if keep is not None:
        t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (N, L', D)
    for blk in backbone.blocks:
        t = blk(t)
    return backbone.norm(t)


def encoder_heads(backbone: nn.Module) -> int:
    """Attention heads of the ViT's first block (the harness ViT's ``attn``, an ``nn.MultiheadAttention``)."""
    heads = getattr(getattr(backbone.blocks[0], "attn", None), "num_heads", None)
    if heads is None:
        raise ValueError("i-jepa: cannot read the encoder's attention heads; set pred_heads")
    return int(heads)


# --- predictor (official VisionTransformerPredictor) -------------------------------------------------


class Predictor(nn.Module):
    """Context tokens (N, L_ctx, D) with their indices, and the target blocks' indices (M, N, K) ->
    predictions (M*N, K, D), block-major (row i*N + n is block i of image n), each block predicted from the
    context and its own mask tokens only (Sec. 3, "Prediction": the predictor is applied M times)."""

    def __init__(self, in_dim: int, grid: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(grid, dim), persistent=False)  # (L, dim) fixed
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       layer_norm_eps=1e-6, batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, in_dim)
        self.apply(_init_trunc_normal)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m, n, k = targets.shape
        pos = self.pos_embed.to(tokens.dtype)
        x = self.embed(tokens) + pos[context]  # (N, L_ctx, dim) context tokens at their positions
        x = x.repeat(m, 1, 1)  # (M*N, L_ctx, dim): the context once per target block
        queries = self.mask_token.to(x.dtype) + pos[targets.reshape(m * n, k)]  # (M*N, K, dim)
        x = torch.cat([x, queries], dim=1)  # (M*N, L_ctx + K, dim)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, -k:]))  # (M*N, K, D) predictions at the mask tokens


def _init_trunc_normal(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for Linear layers and attention input projections,
    unit LayerNorms (official ``init_weights`` of ``init_model``)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.MultiheadAttention):
        nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
        nn.init.zeros_(m.in_proj_bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- targets, loss and EMA -----------------------------------------------------------------------------


def target_tokens(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The targets (M*N, K, D), block-major: the target encoder's tokens h (N, L, D) of the whole image,
    layer-normalised over D without affine parameters, then the target blocks' patches picked out (official
    ``forward_target``: ``F.layer_norm``, then ``apply_masks``)."""
    h = F.layer_norm(h, (h.shape[-1],))  # (N, L, D)
    m, n, k = targets.shape
    idx = targets.reshape(m * n, k)  # (M*N, K)
    return torch.gather(h.repeat(m, 1, 1), 1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def ijepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Eq. (1) as a mean over blocks, images, patches and dimensions: pred, target (M*N, K, D). ``mse``: the
    squared error (the paper); ``smooth_l1``: Huber with beta 1 (the official ``F.smooth_l1_loss``)."""
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r}; expected mse or smooth_l1")


def ema_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """m = start + (end - start) step / total_steps, linear (App. A.1; official ``momentum_scheduler``)."""
    return start + (end - start) * min(step, total_steps) / max(1, total_steps)


# copied from byol.py, which the lead keeps identical
@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


# --- model ----------------------------------------------------------------------------------------


class IJEPA(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.grid = require_vit(backbone)
        if cfg.loss not in ("mse", "smooth_l1"):
            raise ValueError(f"loss {cfg.loss!r}: expected mse or smooth_l1")
        smallest = smallest_target_block(cfg, self.grid)
        if smallest <= cfg.min_keep:
            raise ValueError(f"target blocks of {cfg.target_scale} of a {self.grid}x{self.grid} patch grid can have "
                             f"{smallest} patches, not more than min_keep = {cfg.min_keep}; lower it (--set min_keep=4)")
        if getattr(backbone, "cls_token", None) is not None:
            backbone.cls_token.requires_grad_(False)  # I-JEPA has no [cls] token: never used, never trained
        self.backbone = backbone  # the context encoder f_theta
        self.target_encoder = copy.deepcopy(backbone).requires_grad_(False)  # f_theta_bar, EMA of f_theta
        heads = cfg.pred_heads or encoder_heads(backbone)
        self.predictor = Predictor(feature_dim, self.grid, cfg.pred_dim, cfg.pred_depth, heads)
        self.momentum = cfg.ema_start

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        context, targets = multiblock_masks(len(x), self.grid, self.cfg)  # (N, L_ctx), (M, N, K) on the CPU
        context, targets = context.to(x.device), targets.to(x.device)
        with torch.no_grad():
            target = target_tokens(vit_patch_tokens(self.target_encoder, x).float(), targets)  # (M*N, K, D)
        tokens = vit_patch_tokens(self.backbone, x, context)  # (N, L_ctx, D) the context patches only
        pred = self.predictor(tokens, context, targets)  # (M*N, K, D)
        loss = ijepa_loss(pred.float(), target, self.cfg.loss)  # Eq. (1)
        return {"loss": loss, "context_patches": float(context.shape[1]), "target_patches": float(targets.shape[2]),
                "momentum": self.momentum}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """theta_bar <- m theta_bar + (1 - m) theta after the optimizer step; the k-th update uses the
        schedule's (k-1)-th value, as the official generator (0.996 at the first update)."""
        self.momentum = ema_momentum(step - 1, total_steps, self.cfg.ema_start, self.cfg.ema_end)
        ema_update(self.target_encoder, self.backbone, self.momentum)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The target encoder's output tokens of the whole image, average-pooled (App. A.1)."""
        return vit_patch_tokens(self.target_encoder, x).mean(dim=1)  # (N, D)


MODEL = IJEPA


if __name__ == "__main__":
    ctx, tgt = multiblock_masks(2, 8, Config(min_keep=4), generator=torch.Generator().manual_seed(0))
    print("context patches:", ctx.shape[1], "target blocks:", tuple(tgt.shape), "first block:", tgt[0, 0].tolist())
