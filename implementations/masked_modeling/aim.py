"""AIM — El-Nouby, Klein, Zhai, Bautista, Toshev, Shankar, Susskind, Joulin. "Scalable Pre-training of Large
Autoregressive Image Models". ICML 2024, arXiv:2401.08541 (the ICML proceedings list Shankar before Toshev).
Catalog id: ``aim``. Official code: https://github.com/apple/ml-aim (``aim-v1/``: the models, the prefix
attention ``PrefixCausalAttention`` and the attentive probe; the pre-training loop is not released).

An image is cut into K patches read in raster (row-major) order, and a ViT predicts every patch from the
ones before it (Sec. 4.1, Eq. 1): the output at position k, after a per-patch MLP head, regresses the
pixels of patch k + 1 (Fig. 2: the targets are the input sequence shifted left by one). The attention is
prefix-causal (Sec. 4.2, "Prefix Transformer"; Fig. 3): for each image a prefix length S is drawn
uniformly from {1, ..., K - 1}; the first S patches attend to each other in both directions, every later
patch attends to the prefix and to the patches up to itself, and only the K - S patches after the prefix
are predicted (Fig. 3: the loss covers the patches after the prefix only; AIMv2, arXiv:2411.14402, Sec.
2.2 restates it as M ~ U{1, ..., I - 1} with the loss on {x_i | i > M}). The loss is Eq. (2) restricted to
those patches, on per-patch normalised pixels (Sec. 4.2 and Table 3a, following MAE):

    L = 1/N sum_n 1/K sum_{k = S_n + 1}^{K} 1/P || x_hat_{n,k}(x_{n,<k}) - x~_{n,k} ||^2,
    x~ = (x - mean(x)) / sqrt(var(x) + 1e-6) per patch,     S_n ~ U{1, ..., K - 1}

with P = p*p*3 values per patch (1/P makes it a mean squared error: a constant factor on Eq. 2's squared
norm) and Eq. (2)'s 1/K kept although only K - S patches are predicted (the paper does not say how it
normalises under the prefix; 1/K weighs every predicted patch alike, whatever the image's prefix).

Collapse: none to prevent. The target is the image's own (normalised) pixels, which a constant trunk
cannot predict; what the method must prevent is peeking at the patch it predicts, and the causal part of
the mask does that (the output at position k never sees patch k + 1).

Backbone: the harness's ViT (``--backbone vit_tiny``) walked part by part (``aim_tokens``): ``patch_embed``
a strided conv (kernel = stride = p), ``pos_embed`` (L, D) fixed sin-cos, ``blocks`` of pre-norm
``Block``s whose ``attn`` is ``nn.MultiheadAttention(batch_first=True)``, ``norm``, ``num_patches``; each
block is run with the prefix-causal ``attn_mask`` by ``block_forward``, the block's own computation
x + attn(norm1(x)), then + mlp(norm2(x)). Another backbone gets a one-line ValueError. The ViT's CLS token is
dropped: the official AIM has none (Sec. 4.2, "we do not append a classification token"), so the trunk
sees the K patch tokens only and the CLS parameter is frozen (no gradient reaches it, and DDP needs none).

Features for evaluation (``embed``): the mean over the K patch tokens of the whole image after the final
norm, with full bidirectional attention (no mask): the paper drops the causal mask downstream (Fig. 3;
Table 3d: prefix pre-training with bidirectional evaluation is best) and evaluates the frozen trunk with an
attentive probe over patch features (Sec. 4.2, Eq. 4); the harness's k-NN and linear probes need one
vector per image, so mean pooling stands in for the attention pooling.

Deviations:
- the trunk is the harness's ViT: biases in every Linear, PyTorch's initialisation and LayerNorm eps 1e-5;
  AIM drops the biases (Sec. 4.2) and its official layers use eps 1e-6. The MLP head here has no biases;
- the head's layout is not published in detail: a bias-free input projection to ``head_dim``, ``head_depth``
  residual pre-norm MLP blocks of expansion 4 (Sec. 4.2: "N blocks of MLP", "expansion ratio of 4"), a
  final LayerNorm and a linear map to the patch's pixels; the sin-cos position embedding of the token's own
  position is added to the trunk output before the head (Sec. 4.2);
- ``embed`` mean-pools the last block's normalised output; the official probe (``main_attnprobe.py``)
  averages the raw outputs of several blocks (the last 6, or the "best" 6) and pools them with attention;
- schedule: AdamW with linear warm-up and cosine decay to 0 per step (Sec. 4.2); the paper counts
  iterations, the harness epochs (``epochs``, ``warmup_epochs`` convert at batch 4096 over ImageNet-1k);
  no gradient clipping (the harness has none);
- the crop is resized bilinearly so that it runs batched on the device (the paper's interpolation was not
  verified); biases and norm parameters get no weight decay (the harness's optimizer groups);
- prefix lengths are drawn inside ``forward`` with torch's global generator, per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    head_dim: int = 2048
    """Width of the MLP head (Sec. 5.2, "Structure of the MLP": 12 blocks of width 2048 by default; Table
    4a: 2048 best of 512/1024/2048)."""
    head_depth: int = 12
    """MLP blocks in the head (Sec. 4.2: 12 by default, whatever the trunk's size; Table 4b: 12 best of
    6/8/12)."""
    head_mlp_ratio: float = 4.0
    """Hidden expansion of each head block (Sec. 4.2: 4, as in the trunk's MLPs)."""
    norm_pix_loss: bool = True
    """Per-patch normalised pixels as the target (Sec. 4.2; Table 3a: normalised pixels with MSE best)."""
    min_scale: float = 0.4
    """Smallest area fraction of the random resized crop (Table 3c: 0.4 best of 0.08/0.4/1.0, the default)."""
    optimizer: str = "adamw"
    """AdamW (Sec. 4.2)."""
    base_lr: float = 6.25e-5
    """Per 256 images: 1e-3 at batch 4096 (Table 1, the same for every size). The paper states no scaling
    rule; the harness scales linearly, which gives exactly 1e-3 at the paper's batch."""
    weight_decay: float = 0.05
    """Not verified in the paper: its value is in Appendix D's table, which I could not read. 0.05 is the
    value of lightly's re-implementation of AIM (``benchmarks/imagenet/vitb16/aim.py``)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Not verified in the paper (Appendix D, not read); (0.9, 0.95) as in lightly's re-implementation."""
    warmup_epochs: int = 100
    """Linear warm-up (Sec. 4.2). Its length is not verified in the paper (Appendix D, not read): 31,250
    iterations in lightly's re-implementation, i.e. about 100 passes over ImageNet-1k's 1.28M images at
    batch 4096."""
    epochs: int = 1600
    """AIM-0.6B is pre-trained for 500k iterations at batch 4096 (Fig. 4 caption; Table 1: 0.5T patches;
    Sec. 5.1: 500k iterations are 2B images seen): 2.05B images, about 1,600 passes over
    ImageNet-1k (the ablations' data, Table 3). The main AIM-0.6B uses DFN-2B+, where epochs do not apply."""
    batch_size: int = 4096
    """Table 1."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64,
# ``--backbone vit_tiny``: 32 px, 4-px patches, 64 patches, 192 wide, 6 blocks):
# - head 256 wide, 3 blocks: the paper's 12 x 2048 head on a 1536-wide, 24-block trunk is 4/3 of its width
#   and half its depth; the same ratios on vit_tiny give 256 x 3 (the paper's head would have ~400M
#   parameters, seventy times vit_tiny);
# - base_lr 1.5e-3, warm-up 2 epochs: the paper's rate (1.6e-5 at batch 64) hardly moves the trunk in 330
#   steps, and 100 warm-up epochs are longer than the run (the same change as MAE's preset).
PRESETS = {"small": dict(head_dim=256, head_depth=3, base_lr=1.5e-3, warmup_epochs=2)}


# --- augmentations (Table 3c) ----------------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: random resized crop (scale 0.4-1, Table 3c) and horizontal flip (the flip is not verified
    in the paper's text I read). The prefix lengths are drawn inside ``forward``. One v2 pipeline; it takes
    a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- patches and the prefix-causal mask -------------------------------------------------------------


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order of the grid (the order of a strided conv's
    flattened output), each patch's values ordered (row, column, channel)."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"images of {h}x{w} px do not split into {patch} px patches")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)  # (N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def sample_prefix_lengths(n: int, length: int, device: torch.device | str = "cpu",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) prefix lengths S drawn uniformly from {1, ..., L - 1}, one per image (Fig. 3; AIMv2 Sec. 2.2):
    at least one patch is context and at least one is predicted. The same generator state gives the same
    lengths."""
    if length < 2:
        raise ValueError(f"a prefix needs at least 2 patches to leave one to predict, got {length}")
    return torch.randint(1, length, (n,), device=device, generator=generator)  # (N,) in [1, L - 1]


def prefix_attention(prefix_len: torch.Tensor, length: int) -> torch.Tensor:
    """(N, L, L) bool, True where query i may attend to key j: j <= i (causal) or j < S (the prefix, seen
    by every query and bidirectionally among prefix queries), as the official ``PrefixCausalAttention``.
    The diagonal is always allowed, so no row is empty. S = 1 is plain causal attention."""
    pos = torch.arange(length, device=prefix_len.device)
    causal = pos[None, :] <= pos[:, None]  # (L, L) key j <= query i
    prefix = pos[None, None, :] < prefix_len[:, None, None]  # (N, 1, L) key j in the prefix
    return causal[None] | prefix  # (N, L, L)


# --- the ViT walked with an attention mask ----------------------------------------------------------


def block_forward(blk: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm block of the harness's ViT on x (N, T, D) with ``attn_mask`` for its
    ``nn.MultiheadAttention`` ((N * heads, T, T) bool, True where attention is blocked, or None): the
    block's own x + attn(norm1(x)), then + mlp(norm2(x))."""
    h = blk.norm1(x)
    x = x + blk.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
    return x + blk.mlp(blk.norm2(x))


def aim_tokens(backbone: nn.Module, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The K patch tokens (N, L, D) of x (N, C, H, W) after the final norm, without the CLS token;
    ``allowed`` (N, L, L) bool restricts the attention of every block (``prefix_attention``), None is full
    bidirectional attention."""
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"aim: images of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; the ViT has "
                         f"position embeddings for {backbone.pos_embed.shape[0]}")
    t = t + backbone.pos_embed.to(t.dtype)
    for blk in backbone.blocks:
        blocked = None if allowed is None else (~allowed).repeat_interleave(blk.attn.num_heads, dim=0)
        t = block_forward(blk, t, blocked)  # blocked: (N * heads, L, L), sample-major as MHA expects
    return backbone.norm(t)


# --- head and loss ----------------------------------------------------------------------------------


class MLPBlock(nn.Module):
    """x + W2 GELU(W1 LN(x)), bias-free, per token (a Transformer block without attention)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MLPHead(nn.Module):
    """Trunk tokens (N, L, D) -> pixel predictions (N, L, P), each token on its own (Sec. 4.2, "MLP
    prediction heads"); discarded after pre-training."""

    def __init__(self, in_dim: int, dim: int, depth: int, mlp_ratio: float, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim, bias=False)
        self.blocks = nn.Sequential(*(MLPBlock(dim, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pred(self.norm(self.blocks(self.embed(tokens))))  # (N, L, P)


def aim_loss(pred: torch.Tensor, target: torch.Tensor, prefix_len: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Eq. (2) on the patches after each image's prefix. pred (N, L, P): the output at position k predicts
    patch k + 1 (the last position predicts nothing); target (N, L, P): the patchified images; prefix_len
    (N,) S in [1, L - 1], patches 0..S-1 (0-based) being the prefix. Returns
    1/N sum_n 1/L sum_{k >= S_n} mean_P (pred[n, k-1] - x~[n, k])^2, with x~ each target patch normalised by
    its own mean and unbiased variance (+1e-6) when ``norm_pix`` (as MAE's ``forward_loss``)."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's official code
        target = (target - mean) / (var + 1e-6) ** 0.5
    length = target.shape[1]
    per_patch = (pred[:, :-1] - target[:, 1:]).pow(2).mean(dim=-1)  # (N, L-1) row j: error on patch j + 1
    patch_index = torch.arange(1, length, device=target.device)  # (L-1,) the patch each row predicts
    predicted = (patch_index[None, :] >= prefix_len[:, None]).to(per_patch.dtype)  # (N, L-1) after the prefix
    return ((per_patch * predicted).sum(dim=1) / length).mean()  # Eq. (2): 1/K per image, mean over images


# --- model ----------------------------------------------------------------------------------------


def patch_size(backbone: nn.Module) -> int:
    """The ViT's patch side, from its strided patch embedding; a one-line error for another backbone."""
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    needed = ("pos_embed", "blocks", "norm", "num_patches")
    if stride is None or not all(hasattr(backbone, a) for a in needed):
        raise ValueError(f"AIM needs a ViT with patch tokens (--backbone vit_tiny); {type(backbone).__name__} "
                         f"has no patch_embed, pos_embed, blocks, norm or num_patches")
    return int(stride[0])


class AIM(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.patch = patch_size(backbone)
        if getattr(backbone, "cls_token", None) is not None:
            backbone.cls_token.requires_grad_(False)  # AIM has no CLS token: never used, so frozen
        channels = backbone.patch_embed.in_channels
        self.head = MLPHead(feature_dim, cfg.head_dim, cfg.head_depth, cfg.head_mlp_ratio, self.patch**2 * channels)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        length = self.backbone.num_patches
        prefix_len = sample_prefix_lengths(len(x), length, x.device)  # (N,)
        tokens = aim_tokens(self.backbone, x, prefix_attention(prefix_len, length))  # (N, L, D)
        pred = self.head(tokens + self.backbone.pos_embed.to(tokens.dtype))  # (N, L, p*p*C)
        loss = aim_loss(pred.float(), patchify(x, self.patch).float(), prefix_len, self.cfg.norm_pix_loss)
        return {"loss": loss}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the patch tokens of the whole image under full bidirectional attention (N, D)."""
        return aim_tokens(self.backbone, x).mean(dim=1)


MODEL = AIM


if __name__ == "__main__":
    s = sample_prefix_lengths(2, 6, generator=torch.Generator().manual_seed(0))
    print("prefix lengths:", s.tolist())
    print(prefix_attention(s, 6).int())
