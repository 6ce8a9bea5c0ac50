"""CAE — Chen, Ding, Wang, Xin, Mo, Wang, Han, Luo, Zeng, Wang. "Context Autoencoder for Self-Supervised
Representation Learning". arXiv:2202.03026 (2022); the journal version is cited as IJCV 2023 (not verified
here). Catalog id: ``cae``. Official code:
https://github.com/lxtGH/CAE (``models/modeling_cae.py``, ``models/modeling_cae_helper.py``,
``furnace/masking_generator.py``, ``scripts/cae_base_800e.sh``); also PaddlePaddle/VIMER and Atten4Vis/CAE.

An image's L patches are split by BEiT-style block masking into visible patches V and masked patches M,
|M| = 50% of L exactly (98 of 196, official ``--num_mask_patches 98``). Four parts (Sec. 3):

- encoder F: the ViT on the visible patches only, with their position embeddings and a CLS token:
  Z_v = F(X_v) (the encoder never sees a mask token);
- latent contextual regressor H: blocks of cross-attention whose queries are one learned mask token per
  masked patch plus that patch's position embedding, and whose keys and values are the visible latents Z_v
  (not updated by the regressor) together with the current queries (official ``VisionTransformerNeck``:
  keys = [Z_v; Q] + positions, values = [Z_v; Q]); output, after a LayerNorm, the predicted latents Z_m;
- alignment: the same encoder run on the masked patches alone, under a stop-gradient,
  Z̄_m = sg[F(X_m)] (official ``teacher``: a copy of the encoder refreshed with ``--base_momentum 0``,
  i.e. the encoder's own weights, run under no_grad);
- decoder G: Z_m plus the masked positions' embeddings -> self-attention blocks on the masked tokens only
  -> a linear head to the target of each masked patch; the decoder never sees Z_v.

Objective (the paper's Sec. 3 loss; official ``engine_for_pretraining.py``):

    L = l_dec(G(Z_m), Y_m) + lambda * 1/(|M| D) sum_{i in M} ||Z_m,i - sg[Z̄_m,i]||^2,     lambda = 2

with l_dec here the MAE loss on per-patch normalised pixels (see deviations), averaged over the masked
patches: 1/|M| sum_{i in M} 1/P sum_j (y_hat_ij - y~_ij)^2, y~_i = (y_i - mean(y_i)) / sqrt(var(y_i) + 1e-6).

Collapse: the alignment term alone would be minimised by a constant encoder; the decoder term prevents
that, because the masked patches' pixels must be decoded from Z_m alone, so Z_m (and the encoder space it
is aligned to) must carry the image's content. The stop-gradient keeps the alignment from pulling the
target towards the prediction.

Backbone: a ViT (selfsup's ``vit_tiny``, ``--backbone vit_tiny``) with ``forward_tokens(x, keep)`` that encodes
only the patches indexed by ``keep`` (N, L') and returns (N, 1 + L', D), CLS first; ``patch_embed`` a strided
conv; ``pos_embed`` its fixed (L, D) sin-cos embeddings, which the regressor and decoder reuse as the
official code reuses the encoder's; ``num_patches``. The regressor and decoder are as wide as the encoder
(the official ViT-B setting, ``--decoder_embed_dim 768`` = the encoder's 768), so Z_m and Z̄_m share a space.

Hyperparameters are taken from the official ViT-B script and flags; the paper's own section and table numbers
for them could not be read here, so each field cites the flag.

``embed`` returns the CLS token of the whole image after the encoder's final LayerNorm: the official
standard linear probe (``tools/run_linear.py --linear_type standard --use_cls``). The paper also reports
attentive probing, a trained cross-attention block on the patch tokens; that is a probe, not a feature,
and is not returned here.

Deviations:
- target: the paper decodes to the DALL-E tokenizer's discrete tokens (cross-entropy over 8192 codes);
  offline no tokenizer is available, so the decoder regresses per-patch normalised pixels with MAE's loss
  (the paper's ablation with pixel targets is a variant of the same method). The alignment term is
  unchanged;
- the alignment target is computed with the online encoder's current weights under no_grad; the official
  ``teacher`` is overwritten with the encoder's weights after computing the target, so its target uses the
  weights of one optimiser step earlier. Same network, no separate copy kept;
- block masking: the official generator loops until exactly |M| patches are masked; here one candidate
  block per image per round, all images at once, and after ``max_rounds`` rounds any shortfall is filled
  with random unmasked patches (a guard the official loop lacks, so the count is always exact);
- the encoder is the harness's ViT: no layer scale (official ``--layer_scale_init_value 0.1``), no drop
  path (official 0.1), PyTorch's default initialisation. The regressor and decoder keep the official layer
  scale 0.1 and truncated-normal(0.02) initialisation with BEiT's depth rescaling;
- attention in the regressor and decoder is ``nn.MultiheadAttention`` (biases on q, k, v); the official code
  has no key bias, which changes nothing since a key bias adds the same term to every logit of a query;
- the crop is resized bilinearly, not bicubically (official ``--train_interpolation bicubic``), so that it runs
  batched on the device; the harness does not clip gradients (official ``--clip_grad 3.0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    mask_ratio: float = 0.5
    """Share of patches masked, exactly, per image: 98 of 196 (official ``--num_mask_patches 98``; the
    paper's 50%)."""
    min_block_patches: int = 16
    """Smallest area of one mask block, in patches (official ``--min_mask_patches_per_block 16``, as BEiT)."""
    min_aspect: float = 0.3
    """Block aspect ratios are log-uniform in [0.3, 1/0.3] (official ``MaskingGenerator`` default)."""
    regressor_depth: int = 4
    """Cross-attention blocks of the latent contextual regressor (official ``--regressor_depth 4``)."""
    decoder_depth: int = 4
    """Self-attention blocks of the decoder (official ``--decoder_depth 4``)."""
    decoder_heads: int = 12
    """Attention heads of regressor and decoder (official ``--decoder_num_heads 12``)."""
    layer_scale: float = 0.1
    """Layer-scale init of regressor and decoder blocks (``--decoder_layer_scale_init_value 0.1``, ViT-B)."""
    lambd: float = 2.0
    """Weight lambda of the alignment loss (official ``--align_loss_weight 2``, "2 by default" in the README)."""
    norm_pix_loss: bool = True
    """Per-patch normalised pixels as the decoder's target (the offline stand-in for DALL-E tokens, as MAE)."""
    max_rounds: int = 200
    """Block-masking rounds before a shortfall is filled at random (a guard of this file, not the paper's)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official ``--crop_min_size 0.08``); with the flip,
    the only augmentation (``--color_jitter 0``)."""
    optimizer: str = "adamw"
    """AdamW (official ``--opt adamw``)."""
    base_lr: float = 1.5e-3 * 256 / 2048
    """lr 1.5e-3 at batch 2048 (``--lr 1.5e-3``, 32 GPUs x 64; not rescaled in the code), i.e. 1.875e-4 per
    256 images; cosine decay."""
    weight_decay: float = 0.05
    """Official ``--weight_decay`` default 0.05."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Official ``--opt_betas`` unset, so AdamW's defaults (the paper's text on betas not verified here)."""
    warmup_epochs: int = 20
    """Linear warm-up for the 800-epoch schedule (``--warmup_epochs 20``; README: 10/20/40 for 300/800/1600)."""
    epochs: int = 800
    """ViT-B schedule of ``scripts/cae_base_800e.sh`` (300 and 1600 are also reported)."""
    batch_size: int = 2048
    """32 GPUs x 64 (README: "effective batch size 2048")."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64,
# ``--backbone vit_tiny``: 32 px, 4 px patches, an 8 x 8 grid of 64 patches, 192 wide, 3 heads):
# - regressor and decoder 2 blocks each, 3 heads: eight extra blocks would outweigh the 6-block encoder
#   on a 2-core CPU, and 12 heads of a 192-wide model are 16 wide each;
# - min_block_patches 5: 16 patches are 8% of the paper's 14 x 14 grid; 5 are 8% of 8 x 8;
# - base_lr 1.5e-3, warm-up 2 epochs: 330 steps at the paper's rate (1.2e-5 after batch scaling) hardly
#   move the encoder (as MAE's small preset);
# - min_scale 0.4: 8% crops of an 8 x 8 digit upscaled to 32 px leave a blob (as the other small presets).
PRESETS = {"small": dict(regressor_depth=2, decoder_depth=2, decoder_heads=3, min_block_patches=5,
                         base_lr=1.5e-3, warmup_epochs=2, min_scale=0.4)}


# --- augmentations (official furnace/datasets.py DataAugmentationForCAE) ----------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: horizontal flip and random resized crop (scale 0.08-1), no colour jitter. The mask is
    drawn inside ``forward``. One v2 pipeline; it takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- patches and masks ----------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order of the grid (the order of a strided conv's
    flattened output), each patch's values ordered (row, column, channel)."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"images of {h}x{w} px do not split into {patch} px patches")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)  # (N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def exact_block_masking(n: int, h: int, w: int, num_masked: int, min_patches: int = 16, min_aspect: float = 0.3,
                        max_rounds: int = 200, generator: torch.Generator | None = None) -> torch.Tensor:
    """CAE's block-wise masks with an exact count (official ``MaskingGenerator``). Returns ``mask`` (N, h*w)
    bool, True where masked, row-major, with exactly ``num_masked`` True per row. Per round each unfinished
    image draws one block of area U(min_patches, budget) (budget = patches still to mask) and aspect ratio
    log-uniform in [min_aspect, 1/min_aspect]; it is accepted if it lies strictly inside the grid and adds
    between 1 and budget new patches. After ``max_rounds`` rounds the rest is filled with random unmasked
    patches. On the CPU; the same generator state gives the same masks."""
    length = h * w
    if not 0 <= num_masked < length:
        raise ValueError(f"cannot mask {num_masked} of {length} patches: at least one must stay visible")
    mask = torch.zeros(n, h, w, dtype=torch.bool)  # (N, h, w)
    done = torch.zeros(n, dtype=torch.long)  # (N,) patches masked so far
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(max_rounds):
        active = done < num_masked  # (N,)
        if not active.any():
            break
        u = torch.rand(4, n, dtype=torch.float64, generator=generator)  # (4, N) one candidate per image
        budget = (num_masked - done).double()  # (N,)
        area = min_patches + (budget - min_patches) * u[0]  # random.uniform(min_patches, budget)
        aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
        bh = torch.round(torch.sqrt(area * aspect)).long()  # (N,) half to even, as Python's round
        bw = torch.round(torch.sqrt(area / aspect)).long()
        fits = (bh < h) & (bw < w)
        top = (u[2] * (h - bh + 1)).floor().long().clamp(0, h - 1)  # random.randint(0, h - bh)
        left = (u[3] * (w - bw + 1)).floor().long().clamp(0, w - 1)
        block = ((rows >= top.view(n, 1, 1)) & (rows < (top + bh).view(n, 1, 1))
                 & (cols >= left.view(n, 1, 1)) & (cols < (left + bw).view(n, 1, 1)))  # (N, h, w)
        new = (block & ~mask).sum(dim=(1, 2))  # (N,) patches the block would add
        accept = active & fits & (new > 0) & (new <= budget)
        mask |= block & accept.view(n, 1, 1)
        done += torch.where(accept, new, 0)
    mask = mask.view(n, length)
    short = num_masked - mask.sum(1)  # (N,) zero unless the rounds ran out
    if short.any():
        noise = torch.rand(n, length, generator=generator).masked_fill(mask, 2.0)  # masked ones sort last
        rank = noise.argsort(1).argsort(1)  # (N, L) rank of each patch among the unmasked
        mask |= rank < short.view(n, 1)
    return mask


def split_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (N, L) bool with the same count per row -> (visible (N, L - M), masked (N, M)) patch indices,
    each in ascending grid order (the order of the official boolean indexing)."""
    m = int(mask[0].sum())
    order = mask.to(torch.int8).argsort(dim=1, stable=True)  # (N, L) visible first, then masked
    return order[:, : mask.shape[1] - m], order[:, mask.shape[1] - m :]


# --- regressor and decoder (official modeling_cae_helper.py) ---------------------------------------


class RegressorBlock(nn.Module):
    """Cross-attention block: queries (masked) attend to [visible latents; queries]; keys carry positions,
    values do not; post-attention LayerNorm, then an MLP (official ``RegressorBlock``)."""

    def __init__(self, dim: int, heads: int, layer_scale: float):
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, q: torch.Tensor, z_v: torch.Tensor, pos_m: torch.Tensor, pos_v: torch.Tensor) -> torch.Tensor:
        kv = torch.cat([z_v, q], dim=1)  # (N, L_v + M, D)
        pos_kv = torch.cat([pos_v, pos_m], dim=1)  # (N, L_v + M, D)
        a = self.attn(self.norm_q(q + pos_m), self.norm_k(kv + pos_kv), self.norm_v(kv), need_weights=False)[0]
        x = self.norm2(q + self.gamma1 * a)  # (N, M, D)
        return x + self.gamma2 * self.mlp(x)


class Block(nn.Module):
    """Pre-norm self-attention block with layer scale (official ``Block``), for the decoder."""

    def __init__(self, dim: int, heads: int, layer_scale: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.gamma1 * self.attn(h, h, h, need_weights=False)[0]
        return x + self.gamma2 * self.mlp(self.norm2(x))


class Neck(nn.Module):
    """Regressor H and decoder G: visible latents (N, L_v, D) and positions -> (predicted latents Z_m
    (N, M, D), decoder outputs (N, M, P)) (official ``VisionTransformerNeck``)."""

    def __init__(self, dim: int, patch_values: int, cfg: Config):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.regressor = nn.ModuleList(RegressorBlock(dim, cfg.decoder_heads, cfg.layer_scale)
                                       for _ in range(cfg.regressor_depth))
        self.decoder = nn.ModuleList(Block(dim, cfg.decoder_heads, cfg.layer_scale) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch_values)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        for depth, blk in enumerate([*self.regressor, *self.decoder]):  # BEiT's fix_init_weight, per stack
            layer = depth + 1 if depth < len(self.regressor) else depth + 1 - len(self.regressor)
            blk.attn.out_proj.weight.data.div_(math.sqrt(2.0 * layer))
            blk.mlp[2].weight.data.div_(math.sqrt(2.0 * layer))

    def forward(self, z_v: torch.Tensor, pos_v: torch.Tensor, pos_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.mask_token.expand(len(z_v), pos_m.shape[1], -1)  # (N, M, D)
        for blk in self.regressor:
            q = blk(q, z_v, pos_m, pos_v)  # z_v is not updated
        z_m = self.norm(q)  # (N, M, D) predicted latents
        x = z_m + pos_m
        for blk in self.decoder:
            x = blk(x)  # masked tokens only
        return z_m, self.head(self.norm2(x))  # (N, M, D), (N, M, P)


def _init_weights(m: nn.Module) -> None:
    """Truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms (official ``_init_weights``)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.MultiheadAttention):
        nn.init.trunc_normal_(m.in_proj_weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(m.in_proj_bias)


# --- loss -----------------------------------------------------------------------------------------


def cae_loss(pred: torch.Tensor, target: torch.Tensor, z_pred: torch.Tensor, z_target: torch.Tensor,
             lambd: float = 2.0, norm_pix: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CAE objective with pixel targets. pred, target: (N, M, P) decoder outputs and the masked patches' pixels;
    z_pred, z_target: (N, M, D) predicted latents and the encoder's latents of the masked patches (detached
    here: the stop-gradient). Returns (loss, decoder term, alignment term before lambda)."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's official code
        target = (target - mean) / (var + 1e-6) ** 0.5
    rec = (pred - target).pow(2).mean()  # mean over masked patches of the per-patch MSE (same M per image)
    align = (z_pred - z_target.detach()).pow(2).mean()  # F.mse_loss over (N, M, D), official
    return rec + lambd * align, rec, align  # L = l_dec + lambda l_align


# --- model ----------------------------------------------------------------------------------------


def patch_size(backbone: nn.Module) -> int:
    """The ViT's patch side, from its strided patch embedding; a one-line error for another backbone."""
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    if stride is None or not all(hasattr(backbone, a) for a in ("forward_tokens", "num_patches", "pos_embed")):
        raise ValueError(f"CAE needs a ViT with patch tokens (--backbone vit_tiny); {type(backbone).__name__} "
                         f"has no forward_tokens, patch_embed, pos_embed or num_patches")
    return int(stride[0])


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, L, D) or (L, D), index (N, L') -> (N, L', D)."""
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(len(index), -1, -1)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class CAE(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.patch = patch_size(backbone)
        self.grid = math.isqrt(backbone.num_patches)
        if self.grid**2 != backbone.num_patches:
            raise ValueError(f"CAE's block masks need a square patch grid, got {backbone.num_patches} patches")
        self.num_masked = round(cfg.mask_ratio * backbone.num_patches)
        self.neck = Neck(feature_dim, self.patch**2 * backbone.patch_embed.in_channels, cfg)

    def draw_mask(self, n: int) -> torch.Tensor:
        """(N, L) bool block masks from the global RNG, on the CPU."""
        return exact_block_masking(n, self.grid, self.grid, self.num_masked, self.cfg.min_block_patches,
                                   self.cfg.min_aspect, self.cfg.max_rounds)

    @torch.no_grad()
    def latent_target(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """sg[F(X_m)]: the encoder on the masked patches alone (with its CLS token), no gradient (N, M, D)."""
        return self.backbone.forward_tokens(x, masked)[:, 1:]

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        mask = self.draw_mask(len(x)).to(x.device)  # (N, L)
        visible, masked = split_indices(mask)  # (N, L_v), (N, M)
        z_v = self.backbone.forward_tokens(x, visible)[:, 1:]  # (N, L_v, D) encoder sees visible patches only
        pos = self.backbone.pos_embed.to(z_v.dtype)  # (L, D)
        z_m, pred = self.neck(z_v, gather_tokens(pos, visible), gather_tokens(pos, masked))
        target = gather_tokens(patchify(x, self.patch), masked)  # (N, M, P)
        loss, rec, align = cae_loss(pred.float(), target.float(), z_m.float(), self.latent_target(x, masked).float(),
                                    self.cfg.lambd, self.cfg.norm_pix_loss)
        return {"loss": loss, "loss_dec": rec.detach(), "loss_align": align.detach()}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token of the whole image after the final norm (official linear probe, ``--use_cls``)."""
        return self.backbone(x)


MODEL = CAE


if __name__ == "__main__":
    m = exact_block_masking(2, 8, 8, 32, 5, generator=torch.Generator().manual_seed(0))
    print(m.view(2, 8, 8).int(), "masked per sample:", m.sum(1).tolist())
