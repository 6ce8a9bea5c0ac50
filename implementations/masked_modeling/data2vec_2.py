"""data2vec 2.0 (image) — Baevski, Babu, Hsu, Auli. "Efficient Self-supervised Learning with Contextualized
Target Representations for Vision, Speech and Language". ICML 2023, arXiv:2212.07525.
Catalog id: ``data2vec-2``. Official code: https://github.com/facebookresearch/fairseq/tree/main/examples/data2vec
(``models/data2vec2.py``, ``models/modalities/images.py``, ``models/modalities/modules.py`` (``Decoder2d``),
``fairseq/data/data_utils.py`` (``compute_block_mask_2d``) and the ViT-B recipe
``config/v2/base_images_only_task.yaml``).

The data2vec objective, made cheap. An EMA teacher encodes each image ONCE, unmasked; its top K blocks'
FFN outputs, each instance-normalised over the patches, are averaged and layer-normalised into the targets.
The student sees M differently masked copies of the image (``clone_batch``, M = 16 for ViT-B), encodes ONLY
the visible patches (inverse block masks: 3 x 3 blocks are kept, 80% of the patches masked, equal counts per
copy), and a light convolutional decoder predicts the targets at the masked patches: the visible latents are
scattered back to the patch grid, the masked positions are filled with N(0, 0.01^2) noise (official
``mask_noise_std``: the official "mask embeddings" are not learned), and 6 grouped 3 x 3 conv layers
(width 768, 16 groups, LayerNorm without affine, GELU, residual) with a final linear map predict each patch.
An extra term regresses the student's CLS token onto the mean target of the image (official ``cls_loss``):

    a^l    = FFN output of the teacher's block l on the unmasked image, (L, D) patch tokens (CLS dropped)
    y      = LN( 1/K sum_{l=B-K+1}^{B} IN(a^l) )       IN: per channel over the L patches; LN: per token, no affine
    f^m    = Dec( scatter(Enc(x, V_m)), noise at M_m )  m = 1..M copies; V_m visible, M_m masked patches
    c^m    = CLS output of Enc(x, V_m);   ybar = 1/L sum_t y_t
    S      = sum_m |M_m|                                 (masked patches of the batch)
    loss   = 1/S [ sum_m sum_{t in M_m} ||f^m_t - y_t||^2 / sqrt(D)  +  lambda S sum_m ||c^m - ybar||^2 / sqrt(D) ]
    teacher <- tau teacher + (1 - tau) student,  tau = tau_0 + (tau_e - tau_0) min(1, k / tau_n)   (step k)

with K = 10 of 12 blocks, lambda = 0.01, tau from 0.9998 to 0.99999 over 100,000 updates (official config).
The 1/S normalisation is fairseq's (the criterion divides the summed losses by ``sample_size`` = S; the CLS
term is multiplied by S first), and the 1/sqrt(D) scale is the official ``loss_scale=None`` default.

Collapse: no negatives. The teacher is a stop-gradient EMA of the student (asymmetry, as BYOL and data2vec);
the targets are normalised per block and per token so that a constant or large-norm layer cannot dominate;
80% of each image is hidden. ``target_var`` and ``pred_var`` (variance over masked patches, averaged over
channels, as fairseq logs them) show a collapse.

Backbone: the harness's ViT only (``--backbone vit_tiny``): ``patch_embed``, ``pos_embed`` (L, D) fixed,
``cls_token``, ``blocks`` of pre-norm blocks with ``norm1``, ``attn``, ``norm2``, ``mlp``, then ``norm``, and
``forward_tokens(x, keep)``. The student runs ``forward_tokens(x, keep)`` on the visible patches only (no
mask token inside the encoder); ``vit_blocks`` walks the teacher part by part to read each block's FFN
output. Other backbones get a one-line error. ``embed``: the paper reports fine-tuning for images and no
linear probe; it returns the student's final patch tokens, mean-pooled and layer-normalised without affine
parameters (the mean pooling of the official image fine-tuning model, ``mae_image_classification.py``; its
exact norm placement not re-checked here).

Distributed: no cross-sample term. Each masked patch is scored against its own image's teacher target, the
normalisations run per token or per image, the CLS target is the image's own mean; masks come from the
rank's own RNG (the official loader draws them per worker), DDP averages per-rank losses.

Deviations:
- the backbone is the harness's pre-norm ViT (fixed sin-cos positions, PyTorch init, no dropout); the
  official data2vec_multi ViT-B is post-norm (``layer_norm_first`` False), its first 2 of 12 blocks are the
  image ``prenet`` (``prenet_depth 2``) and the targets average the 10 blocks after it; here K counts from the
  top of the harness's blocks (K = 10 of 12 is the same set). The FFN output of a pre-norm block is
  ``mlp(norm2(x))``, of the official post-norm block ``mlp(norm1(x + attn(x)))``;
- the official ``ema_encoder_only False`` teacher copies the whole model without the decoder; here the
  teacher is a copy of the backbone (the decoder is never used by the teacher, so this is the same thing);
- the student patch-embeds each of the M copies (``forward_tokens`` on repeated images) where the official
  code embeds once and repeats the embeddings: the same values at M times the (small) patch-embed cost;
- block masks: the official rule (``compute_block_mask_2d`` with ``inverse_mask``, ``require_same_masks``),
  drawn in ``forward`` from torch's RNG on the CPU (officially in the data loader), with random keys in place
  of ``torch.multinomial``: the same distribution, other random numbers (see ``inverse_block_masking``);
- the harness has no gradient clipping (official ``clip_norm 4``), uses AdamW's eps 1e-8 (official 1e-6 is
  fairseq Adam's default, not re-checked), and no fp16; weight decay: none on 1-d parameters (the official
  ``optim_overrides`` for biases and norms), the CLS token decayed (its official override not re-checked);
- the crop is resized bilinearly, not bicubically, so that it runs batched on the device;
- the EMA update after step k uses tau(k) where fairseq's ``set_num_updates`` uses the count before the step;
- the CLS term is the official per-rank formula: after the division by S it is lambda times the SUM over the
  rank's copies, so its weight against the (mean) patch term grows with the copies on one device. Officially
  that is 16 images x 16 copies = 256 per GPU; the small preset (64 x 4 on one CPU) has the same 256, but the
  full Config on one device (256 x 16) would weigh it 16 times more than on the official 16 GPUs.

Sources: the Config is checked against the official ViT-B config file (each field says so). The paper's own
numbers (Sec. 4 and its hyperparameter table) could not be re-read here; where only the code was checked,
the field says so.
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
    clone_batch: int = 16
    """M, masked copies of each image sharing one teacher pass (paper: M = 16 for images; official
    ``clone_batch: 16``)."""
    mask_ratio: float = 0.8
    """Share of patches masked (official ``mask_prob: 0.8`` with ``inverse_mask: true``: 20% kept)."""
    mask_prob_adjust: float = 0.07
    """Extra share of kept blocks drawn before the count is trimmed (official ``mask_prob_adjust: 0.07``)."""
    mask_length: int = 3
    """Side of each kept block, in patches (official ``mask_length: 3``)."""
    mask_noise_std: float = 0.01
    """Std of the Gaussian noise that fills the masked positions of the decoder input (official
    ``mask_noise_std: 0.01``; the mask embeddings are not learned)."""
    top_k_blocks: int = 10
    """K, the teacher's top blocks averaged into the target (official ``average_top_k_layers: 10``)."""
    target_output: str = "ffn"
    """a^l: ``"ffn"``, the FFN output before the last residual connection (official ``end_of_block_targets:
    false``), or ``"block"``, the block's output."""
    instance_norm_target_layer: bool = True
    """Instance-normalise each block over the patches before averaging (official ``instance_norm_target_layer:
    true``, ``layer_norm_target_layer: false``)."""
    layer_norm_targets: bool = True
    """Layer-normalise the average per token (official ``layer_norm_targets: true``)."""
    cls_loss: float = 0.01
    """lambda, weight of the CLS-to-mean-target regression (official ``cls_loss: 0.01``)."""
    decoder_dim: int = 768
    """Decoder width (official ``decoder_dim: 768``)."""
    decoder_kernel: int = 3
    """Decoder conv kernel (official ``decoder_kernel: 3``)."""
    decoder_groups: int = 16
    """Decoder conv groups (official ``decoder_groups: 16``)."""
    decoder_layers: int = 6
    """Decoder conv layers (official ``decoder_layers: 6``)."""
    ema_decay_init: float = 0.9998
    """tau_0 (official ``ema_decay: 0.9998``)."""
    ema_decay_end: float = 0.99999
    """tau_e (official ``ema_end_decay: 0.99999``)."""
    ema_anneal_steps: int = 100000
    """tau_n, updates of the linear ramp (official ``ema_anneal_end_step: 100000``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop; torchvision's default, as the official MAE-style
    image dataset's crop (not re-checked here)."""
    optimizer: str = "adamw"
    """Adam with decoupled weight decay (official composite optimizer: ``adam``, ``weight_decay: 0.05``)."""
    base_lr: float = 1e-3
    """Rate per 256 images: official ``lr: 1e-3`` at 16 images x 16 GPUs = 256, cosine decay."""
    weight_decay: float = 0.05
    """Official ``weight_decay: 0.05``."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Official ``adam_betas: [0.9, 0.95]``."""
    warmup_epochs: int = 10
    """Official ``warmup_updates: 50040`` at 256 images a step: 10 epochs of ImageNet-1K (5,004 steps each)."""
    epochs: int = 75
    """Official ``max_update: 375300`` at 256 images a step: 75 epochs. The paper's epoch count for ViT-B
    could not be re-read here."""
    batch_size: int = 256
    """Official ``dataset.batch_size: 16`` x ``distributed_world_size: 16`` (each image cloned M times)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 15 epochs = 330 steps at batch
# 64, ``--backbone vit_tiny``: 32 px, 4 px patches, an 8 x 8 grid, 6 blocks of width 192):
# - clone_batch 4: 16 copies of a 64-image batch would be 1,024 student passes a step on the CPU;
# - top_k_blocks 5: 10 of ViT-B's 12 blocks, the same share of vit_tiny's 6;
# - mask_length 2: a 3 x 3 block is 14% of an 8 x 8 grid (4.6% of 14 x 14); 2 x 2 is 6%;
# - decoder_dim 192: vit_tiny's width, as 768 is ViT-B's (16 groups still divide it);
# - EMA tau from 0.99 to 0.999 over the first 100 updates: at 0.9998 the teacher would keep 94% of its
#   random initialisation after 330 steps (as the data2vec, DINO and BYOL presets);
# - base_lr 2e-3 (a peak of 5e-4 at batch 64), warm-up 1 epoch: the paper's 10 of 75 epochs would be 2 here
#   and its rate hardly moves the ViT in 330 steps (as the data2vec and MAE presets);
# - min_scale 0.4: 8% crops of an 8 x 8 digit upscaled to 32 px leave a blob (as the other small presets).
PRESETS = {"small": dict(clone_batch=4, top_k_blocks=5, mask_length=2, decoder_dim=192, ema_decay_init=0.99,
                         ema_decay_end=0.999, ema_anneal_steps=100, base_lr=2e-3, warmup_epochs=1, min_scale=0.4)}


# --- augmentations ------------------------------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view, shown to the teacher unmasked and to the student as M masked copies: random resized crop,
    horizontal flip, normalisation (the MAE-style recipe of the official ``mae_image_pretraining`` task, not
    re-checked in detail). The masks are drawn inside ``forward``."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- inverse block masks (official compute_block_mask_2d with inverse_mask) ----------------------------


def inverse_block_masking(n: int, side: int, mask_ratio: float = 0.8, adjust: float = 0.07, length: int = 3,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverse block masks on a side x side grid. Returns ``mask`` (N, side*side) bool, True where a patch is
    masked, row-major. The official rule (``compute_block_mask_2d``, ``inverse_mask``, ``require_same_masks``):
    keep = 1 - mask_ratio; C = int(L (keep + adjust) / length^2) block centres are drawn uniformly WITH
    replacement (official ``torch.randint``; a repeated centre adds nothing); each centre keeps the
    length x length block around it (offsets -length//2 .. length-1-length//2, clamped to the grid, so edge
    blocks shrink); then the kept count is set to exactly int(L keep): a random subset of the kept cells if
    there are more, random extra cells if fewer (official ``torch.multinomial`` without replacement on uniform
    weights, here the top keys of ``torch.rand``: the same distribution). The rest is masked, so every image
    masks L - int(L keep) patches. The same generator state gives the same masks."""
    cells = side * side
    if length < 2:
        raise ValueError(f"mask_length {length}: the block rule needs at least 2")
    keep = 1 - mask_ratio
    num_centres = int(cells * ((keep + adjust) / length**2))
    target = int(cells * keep)
    if not 0 < target <= cells:
        raise ValueError(f"mask_ratio {mask_ratio} keeps {target} of {cells} patches")
    u_centres = torch.rand(n, num_centres, generator=generator)  # (N, C) centre draws
    u = torch.rand(n, cells, generator=generator)  # (N, L) keys of the count correction
    kept = torch.zeros(n, cells, dtype=torch.bool)
    if num_centres > 0:
        centres = (u_centres * cells).long().clamp(max=cells - 1)  # (N, C) randint(0, L)
        rows, cols = centres // side, centres % side
        offset = length // 2
        for i in range(length):
            for j in range(length):
                r = (rows + i - offset).clamp(0, side - 1)
                c = (cols + j - offset).clamp(0, side - 1)
                kept.scatter_(1, r * side + c, True)
    score = kept.float() * 2 + u  # (N, L) kept cells first, in random order, then the others
    final = torch.zeros(n, cells, dtype=torch.bool)
    final.scatter_(1, score.topk(target, dim=1).indices, True)
    return ~final  # (N, L) True: masked


# --- the ViT, part by part ----------------------------------------------------------------------------

VIT_PARTS = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm")


def require_vit(backbone: nn.Module) -> None:
    """A one-line error unless the backbone is a ViT with patch tokens (the attributes of ``VIT_PARTS``)."""
    missing = [a for a in VIT_PARTS if getattr(backbone, a, None) is None]
    if missing:
        raise ValueError(f"data2vec 2.0 needs a ViT with patch tokens (--backbone vit_tiny); "
                         f"{type(backbone).__name__} has no {', '.join(missing)}")


def vit_blocks(backbone: nn.Module, x: torch.Tensor, keep: int = 0,
               output: str = "ffn") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the ViT on the whole image x (N, C, H, W) part by part (the teacher). Returns the final tokens
    (N, 1 + L, D) after ``backbone.norm``, CLS first, and the outputs (N, 1 + L, D) of the last ``keep``
    blocks, lowest first: ``"ffn"``, each block's FFN output before its last residual connection (official
    ``end_of_block_targets: false``), or ``"block"``, the block's output."""
    if output not in ("block", "ffn"):
        raise ValueError(f"target_output {output!r}: expected 'block' or 'ffn'")
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"data2vec 2.0: images of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; the "
                         f"ViT has position embeddings for {backbone.pos_embed.shape[0]}")
    t = t + backbone.pos_embed.to(t.dtype)
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1).to(t.dtype), t], dim=1)  # (N, 1 + L, D)
    outputs = []
    first_kept = len(backbone.blocks) - keep
    for i, blk in enumerate(backbone.blocks):  # the harness's pre-norm Block, written out
        h = blk.norm1(t)
        t = t + blk.attn(h, h, h, need_weights=False)[0]  # (N, 1 + L, D)
        ffn = blk.mlp(blk.norm2(t))  # (N, 1 + L, D) the FFN output before the last residual connection
        t = t + ffn  # (N, 1 + L, D) the block's output
        if i >= first_kept:
            outputs.append(t if output == "block" else ffn)
    return backbone.norm(t), outputs


# --- decoder ------------------------------------------------------------------------------------------


class ConvDecoder(nn.Module):
    """The official ``Decoder2d``: the (N, L, D) grid of latents, as (N, D, h, w), through ``layers`` blocks
    of Conv2d(kernel k, padding k//2, groups g) -> LayerNorm over channels without affine -> GELU, each added
    to its input where the widths match (official ``decoder_residual``, default on), then a linear map
    back to D per patch. Returns (N, L, D)."""

    def __init__(self, dim: int, side: int, width: int = 768, kernel: int = 3, groups: int = 16, layers: int = 6):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"decoder_kernel {kernel}: an odd kernel keeps the grid")
        self.side = side
        self.convs = nn.ModuleList(nn.Conv2d(dim if i == 0 else width, width, kernel, padding=kernel // 2,
                                             groups=groups) for i in range(layers))
        self.proj = nn.Linear(width, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, length, d = z.shape
        x = z.transpose(1, 2).reshape(n, d, self.side, self.side)  # (N, D, h, w)
        for conv in self.convs:
            y = conv(x)  # (N, W, h, w)
            y = F.gelu(F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2]).permute(0, 3, 1, 2))
            x = y + x if y.shape[1] == x.shape[1] else y
        return self.proj(x.flatten(2).transpose(1, 2))  # (N, L, D)


# --- targets and loss ---------------------------------------------------------------------------------


def teacher_targets(layers: list[torch.Tensor], instance_norm: bool = True, layer_norm: bool = True) -> torch.Tensor:
    """y (N, L, D) from the K top blocks' patch tokens, K x (N, L, D) (official ``make_targets``): each block
    instance-normalised per image and channel over the L patches (no affine), averaged, then
    layer-normalised per token. In float32 at least, as officially (``.float()``)."""
    total = 0
    for a in layers:
        a = a.to(torch.promote_types(a.dtype, torch.float32))  # (N, L, D)
        if instance_norm:
            a = F.instance_norm(a.transpose(1, 2)).transpose(1, 2)
        total = total + a
    y = total / len(layers)  # (N, L, D)
    return F.layer_norm(y, y.shape[-1:]) if layer_norm else y


def data2vec2_loss(pred: torch.Tensor, target: torch.Tensor, cls_pred: torch.Tensor, cls_target: torch.Tensor,
                   cls_weight: float = 0.01) -> torch.Tensor:
    """pred, target (S, D) at the S masked patches of all copies; cls_pred, cls_target (B, D), one row per copy
    (official ``d2v_loss`` with ``loss_beta 0``, ``loss_scale None``, and the criterion's division by
    ``sample_size`` = S):  [sum ||pred - target||^2 + cls_weight S sum ||cls_pred - cls_target||^2]
    / (sqrt(D) S). No masked patch gives 0 (connected to pred)."""
    s, d = pred.shape
    if s == 0:
        return pred.sum()
    scale = 1 / math.sqrt(d)
    reg = (pred - target.detach()).pow(2).sum() * scale
    cls = (cls_pred - cls_target.detach()).pow(2).sum() * scale * (cls_weight * s) if cls_weight else 0
    return (reg + cls) / s


def ema_decay(step: int, cfg: Config) -> float:
    """tau after ``step`` updates: linear from tau_0 to tau_e over the first tau_n updates, then tau_e
    (official ``get_annealed_rate`` in ``set_num_updates``)."""
    if step >= cfg.ema_anneal_steps:
        return cfg.ema_decay_end
    return cfg.ema_decay_init + (cfg.ema_decay_end - cfg.ema_decay_init) * step / cfg.ema_anneal_steps


# copied from dino.py, which the contract test keeps identical (this ViT has no BN, and its one view is the
# teacher's and the student's)
@torch.no_grad()
def ema_update_parameters(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- lambda theta_t + (1 - lambda) theta_s, parameters only (official code): the teacher's BN
    statistics are its own, from its forward passes on the global crops; the student's also come from the
    local crops, at another resolution."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - momentum)


# --- model --------------------------------------------------------------------------------------------


class Data2Vec2(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        require_vit(backbone)
        if not callable(getattr(backbone, "forward_tokens", None)):
            raise ValueError("data2vec 2.0 needs a ViT with forward_tokens(x, keep) (--backbone vit_tiny)")
        depth = len(backbone.blocks)
        if not 1 <= cfg.top_k_blocks <= depth:
            raise ValueError(f"top_k_blocks {cfg.top_k_blocks}: the ViT has {depth} blocks")
        if cfg.clone_batch < 1:
            raise ValueError(f"clone_batch {cfg.clone_batch}: at least one masked copy")
        length = backbone.pos_embed.shape[0]
        self.side = math.isqrt(length)
        if self.side**2 != length:
            raise ValueError(f"data2vec 2.0's block masks need a square patch grid, got {length} patches")
        self.cfg = cfg
        self.backbone = backbone  # the student
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)  # EMA, same initial weights
        self.decoder = ConvDecoder(feature_dim, self.side, cfg.decoder_dim, cfg.decoder_kernel,
                                   cfg.decoder_groups, cfg.decoder_layers)
        self.momentum = ema_decay(0, cfg)  # tau of the next update, recomputed from the step (no state)

    def param_groups(self) -> list[dict]:
        """No weight decay on 1-d parameters (biases, norms: the official ``optim_overrides``), decay on the
        rest. The teacher is left out (no gradient)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def draw_masks(self, n: int) -> torch.Tensor:
        """(n, L) bool masks on the CPU, from torch's global RNG."""
        cfg = self.cfg
        return inverse_block_masking(n, self.side, cfg.mask_ratio, cfg.mask_prob_adjust, cfg.mask_length)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x = batch["views"][0]  # (N, C, H, W), the one view
        m = cfg.clone_batch
        with torch.no_grad():  # ONE teacher pass per image, unmasked
            _, top = vit_blocks(self.teacher, x, keep=cfg.top_k_blocks, output=cfg.target_output)
            y = teacher_targets([a[:, 1:] for a in top], cfg.instance_norm_target_layer,
                                cfg.layer_norm_targets)  # (N, L, D)
            y_cls = y.mean(dim=1).repeat_interleave(m, dim=0)  # (N M, D) each copy's image mean
            y = y.repeat_interleave(m, dim=0)  # (N M, L, D) copy m of image i is row i M + m
        b, length, d = y.shape
        mask = self.draw_masks(b).to(x.device)  # (N M, L), the same count in every row
        keep = (~mask).nonzero()[:, 1].view(b, -1)  # (N M, V) visible patch indices, ascending
        s = self.backbone.forward_tokens(x.repeat_interleave(m, dim=0), keep)  # (N M, 1 + V, D), visible only
        noise = torch.randn(b, length, d, device=x.device, dtype=s.dtype) * cfg.mask_noise_std
        z = noise.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), s[:, 1:])  # (N M, L, D) latents + noise
        pred = self.decoder(z)[mask]  # (S, D) the masked patches, row-major
        target = y[mask]  # (S, D)
        loss = data2vec2_loss(pred.float(), target, s[:, 0].float(), y_cls, cfg.cls_loss)
        with torch.no_grad():
            target_var = target.var(dim=0).mean() if len(target) > 1 else y.new_zeros(())
            pred_var = pred.float().var(dim=0).mean() if len(pred) > 1 else y.new_zeros(())
        return {"loss": loss, "target_var": target_var, "pred_var": pred_var,
                "masked_fraction": mask.float().mean(), "ema_decay": torch.tensor(self.momentum)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the ``step``-th optimizer step: theta_t <- tau theta_t + (1 - tau) theta_s, tau = tau(step)."""
        self.momentum = ema_decay(step, self.cfg)
        ema_update_parameters(self.teacher, self.backbone, self.momentum)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The student's final patch tokens (after ``backbone.norm``), mean-pooled and layer-normalised without
        affine parameters. (N, D)"""
        pooled = self.backbone.forward_tokens(x)[:, 1:].mean(dim=1)  # (N, D)
        return F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)


MODEL = Data2Vec2


if __name__ == "__main__":
    mk = inverse_block_masking(2, 14, generator=torch.Generator().manual_seed(0))
    print("masked per image:", mk.sum(1).tolist())
    print(mk[0].view(14, 14).int())
