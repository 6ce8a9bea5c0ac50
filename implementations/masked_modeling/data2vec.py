"""data2vec (image) — Baevski, Hsu, Xu, Babu, Gu, Auli. "data2vec: A General Framework for Self-supervised
Learning in Speech, Vision and Language". ICML 2022, arXiv:2202.03555. Catalog id: ``data2vec``.
Official code: https://github.com/facebookresearch/fairseq (``examples/data2vec``, whose README points to the
vision code, https://github.com/facebookresearch/data2vec_vision/tree/main/beit: ``run_cyclical.py``,
``engine_for_cyclical.py``, ``modeling_cyclical.py``, and the README's ViT-B pre-training command).

A student ViT sees the image with a random set of patch blocks masked: the masked patch embeddings are
replaced by one learned mask token before the position embeddings are added and the Transformer runs, as in
BEiT (Sec. 4, "Computer vision"). A teacher, the exponential moving average of the student (Sec. 3.2), sees
the same image unmasked. The targets are the teacher's top K blocks, each normalised, averaged (Sec. 3.3) and
normalised again (official ``--post_target_layer_norm``); a linear regression head on the student's final
tokens predicts them at the masked patches, with a Smooth L1 loss (Sec. 3.3):

    a^l   = output of the teacher's block l on the unmasked image, (L, D) patch tokens (CLS dropped)
    y     = LN( 1/K sum_{l=B-K+1}^{B} LN(a^l) )                 LN: per token over D, no affine (B blocks)
    f     = W norm(student(x~))_t + b                           x~: masked image, t in M (masked patches)
    loss  = 1/(|M| D) sum_{t in M} sum_d  l_beta(f_td - y_td),  l_beta(e) = e^2 / (2 beta) if |e| <= beta
                                                                           |e| - beta / 2   otherwise
    teacher <- tau teacher + (1 - tau) student,  tau = tau_0 + (tau_e - tau_0) min(1, k / tau_n)   (step k)

with K = 6, beta = 2 and tau constant at 0.9998 for ViT-B (tau_0 = tau_e; official command
``--ema_decay 0.9998 --ema_start_at 0``, which never enters the linear ramp). Which part of a block is its
"output" a^l: the paper describes the FFN's output before the block's last residual connection (Sec. 3.3);
the official vision command sets ``--layer_results 'end'``, the block's output after that connection
(``modeling_cyclical.py``: ``z.append(x)`` after ``x = x + fc_feature``), and that is the default here
(``target_output="block"``); ``"ffn"`` gives the paper's text (``'fc'`` officially). Normalisation: for vision
the per-token layer norm (official ``target_layer_norm_last``, on by default; the paper keeps instance
normalisation over time for speech, Sec. 3.3), ``target_norm="instance"`` normalises each channel over the
image's patches instead.

Collapse: no negatives. The teacher is a stop-gradient EMA of the student (asymmetry, as BYOL); the targets
are normalised per block so that no constant or large-norm layer dominates (Sec. 3.3); and most of the image
is masked, so the student has to infer content. The paper names the settings that collapse: a learning
rate too small or too large, tau too small, too little masked. ``target_var`` and ``pred_var``
(the variance over masked patches, averaged over channels, as fairseq logs them) show it.

Backbone: the harness's ViT only (``--backbone vit_tiny``): ``patch_embed`` a strided conv, ``pos_embed``
(L, D) fixed, ``cls_token``, ``blocks`` of pre-norm blocks with parts ``norm1``, ``attn``
(``nn.MultiheadAttention``), ``norm2``, ``mlp``, and ``norm``. ``vit_blocks`` walks these parts to place the
mask token inside the encoder and read each block's output or FFN output. Other backbones get a one-line
error. ``embed`` returns the official linear-classifier features (``run_class_finetuning.py
--linear_classifier``, mean pooling on by default): the student's last-block patch tokens, mean-pooled and
layer-normalised without affine parameters. For images the paper reports fine-tuning (Table 1), no linear
probe that we know of.

Distributed: no cross-sample term. Each masked patch is scored against its own teacher target, and the
normalisations run per token or per image. The masks come from the rank's own RNG (the official per-GPU data
loader does the same), and DDP averages the per-rank means over masked patches, as the official code does.

Sources: every value of the Config is checked against the official ViT-B command and code. The paper's
section numbers and its wording are cited from memory and from notes that quote it: its full text could not
be re-read here, so where it and the code may differ the field's docstring says so (the warm-up).

Deviations:
- the backbone is the harness's ViT: fixed 2-D sin-cos absolute position embeddings, where the official
  model learns a shared relative position bias (``--rel_pos_bias`` on, no ``--abs_pos_emb``); no LayerScale
  (``--layer_scale_init_value 1e-4``), no stochastic depth (``--drop_path 0.25``), no attention dropout
  (``--attn_drop_rate 0.05``), PyTorch's default initialisation (officially truncated normal 0.02 with the
  BEiT depth rescaling). The mask token and the regression head are initialised as officially (truncated
  normal 0.02, zero bias);
- the teacher copies the backbone only. The official EMA copies the whole student with its head and mask
  token, which the teacher never uses;
- the harness has no gradient clipping (official ``--clip_grad 3.0``). Its cosine schedule decays the lr to
  0 (official ``min_lr 1e-5``) and warms up from 0 (official ``warmup_lr 1e-6``). Weight decay follows
  BEiT's ``get_parameter_groups`` (``param_groups``): none on 1-d parameters and the CLS token, but the
  mask token is decayed;
- the masks use BEiT's rule (``block_masking``) but are drawn in ``forward`` from torch's RNG, one candidate
  block per image per round for all images at once: the same distribution as the official per-image
  ``MaskingGenerator`` with other random numbers. The paper's 60% is rounded to whole patches (118 of 196;
  the official command masks 120);
- the crop is resized bilinearly, not bicubically (official ``--train_interpolation bicubic``), so that it
  runs batched on the device;
- the EMA update after the k-th step uses tau(k) where the official loop uses tau(k - 1). The two differ only
  during a ramp, and the ViT-B setting has none.
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
    top_k_blocks: int = 6
    """K, the teacher's top blocks averaged into the target (Sec. 4: K = 6 for ViT-B; official
    ``--target_layers [6,7,8,9,10,11]`` of 12)."""
    target_output: str = "block"
    """Which output of a block is a^l: ``"block"``, after its last residual connection (official
    ``--layer_results 'end'``), or ``"ffn"``, the FFN output before it (the paper's Sec. 3.3; ``'fc'``)."""
    target_norm: str = "layer"
    """Normalisation of each block before averaging: ``"layer"`` per token over channels (official
    ``target_layer_norm_last``, default on; Sec. 3.3 for vision), ``"instance"`` per channel over the patches
    (Sec. 3.3 for speech; official ``--target_instance_norm``), ``"none"``. No affine parameters."""
    post_target_layer_norm: bool = True
    """Layer-normalise the average again (official ``--post_target_layer_norm`` in the ViT-B command)."""
    loss_beta: float = 2.0
    """beta of the Smooth L1 loss (Sec. 4: beta = 2 for vision; official ``--l1_beta=2.0``; the official
    ``--l2_loss`` is off)."""
    mask_ratio: float = 0.6
    """Share of patches masked, in blocks (Sec. 4: "mask 60% of the patches instead of 40%"; official
    ``--num_mask_patches 120`` of 196)."""
    mask_min_patches: int = 16
    """Smallest block, in patches (Sec. 4: "each block contains at least 16 patches"; official
    ``--min_mask_patches_per_block 16``)."""
    mask_max_fraction: float = 1.0
    """Largest block as a fraction of the patches (official ``--max_mask_patches_per_block 196`` of 196)."""
    mask_min_aspect: float = 0.3
    """Block aspect ratios log-uniform in [0.3, 1/0.3] (BEiT's ``MaskingGenerator(min_aspect=0.3)``)."""
    ema_decay_init: float = 0.9998
    """tau_0 (Sec. 3.2). For ViT-B a constant 0.9998 with no schedule (Sec. 4; official ``--ema_decay 0.9998
    --ema_start_at 0``: the ramp from ``--ema_decay_init 0.999`` is never entered)."""
    ema_decay_end: float = 0.9998
    """tau_e, reached after ``ema_anneal_steps`` updates and kept (Sec. 3.2; official ``--ema_decay``)."""
    ema_anneal_steps: int = 0
    """tau_n, updates of the linear ramp from tau_0 to tau_e (Sec. 3.2; official ``--ema_start_at 0``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (BEiT's ``RandomResizedCropAndInterpolationWithTwoPic``
    default scale=(0.08, 1.0), ratio 3/4-4/3)."""
    color_jitter: float = 0.4
    """Brightness, contrast and saturation jitter, always applied (official ``--color_jitter 0.4``:
    ``ColorJitter(0.4, 0.4, 0.4)``, no hue)."""
    optimizer: str = "adamw"
    """Adam with decoupled weight decay (Sec. 4: Adam; official ``--opt adamw`` default, betas by default)."""
    base_lr: float = 2e-3 * 256 / 2048
    """The harness's rate per 256 images: peak 0.002 at batch 2048 (Sec. 4; official ``--lr 2e-3``, not scaled
    with the batch), with a cosine decay."""
    weight_decay: float = 0.05
    """Official ``--weight_decay 0.05`` (no weight-decay schedule)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's defaults (official ``--opt_betas`` not given)."""
    warmup_epochs: int = 10
    """Linear lr warm-up (official ViT-B command ``--warmup_epochs 10``). The paper's text could not be
    re-checked here; from memory it says 40 epochs for ViT-B (80 for ViT-L, which the ViT-L command uses)."""
    epochs: int = 800
    """ViT-B pre-training (Sec. 4, Table 1; official ``--epochs 800``)."""
    batch_size: int = 2048
    """Sec. 4: 2,048 for ViT-B (official ``--batch_size 128`` on 16 GPUs)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 15 epochs = 330 steps at batch
# 64, ``--backbone vit_tiny``: 32 px, 4 px patches, an 8 x 8 grid, 6 blocks of width 192):
# - top_k_blocks 3: vit_tiny has 6 blocks, and K = 6 of ViT-B's 12 is the top half;
# - mask_min_patches 5: 16 of 196 patches is 8% of the grid, and 5 of 64 is the same share (a 4 x 4 block
#   would be a quarter of the 8 x 8 grid);
# - EMA tau from 0.99 to 0.999 over the first 100 updates: a teacher at 0.9998 would keep 94% of its random
#   initialisation after 330 steps (0.9998^330), so its targets would stay those of a random ViT (DINO's and
#   BYOL's presets also start at 0.99);
# - base_lr 2e-3 (a peak of 5e-4 at batch 64), warm-up 1 epoch: under the paper's rate (6.25e-5 at batch 64)
#   330 steps hardly move the ViT (as the MAE preset); the paper's 10 of 800 epochs would be 0.2 epochs here;
# - min_scale 0.4: 8% crops of an 8 x 8 digit upscaled to 32 px leave a blob (as the other small presets).
PRESETS = {"small": dict(top_k_blocks=3, mask_min_patches=5, ema_decay_init=0.99, ema_decay_end=0.999,
                         ema_anneal_steps=100, base_lr=2e-3, warmup_epochs=1, min_scale=0.4)}


# --- augmentations (official datasets.py, DataAugmentationForBEiT) -------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view, shown to both teacher and student (Sec. 4: "We use the same modified image both in teacher
    mode and student mode"): colour jitter, horizontal flip, random resized crop, in the official order.
    The mask is drawn inside ``forward``. One v2 pipeline; it takes a PIL image or a uint8 tensor."""
    j = cfg.color_jitter
    return [v2.Compose([
        v2.ToImage(),
        v2.ColorJitter(brightness=j, contrast=j, saturation=j),
        v2.RandomHorizontalFlip(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- block masks (BEiT's masking_generator.py, as the official vision code uses it) --------------------


def block_masking(n: int, h: int, w: int, num_masked: int, min_patches: int = 16, max_patches: float | None = None,
                  min_aspect: float = 0.3, generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT's block-wise masks (official ``MaskingGenerator``). Returns ``mask`` (N, h*w) bool, True where a
    patch is masked, in the row-major order of the h x w grid. Each image adds blocks until it has
    ``num_masked`` patches. A candidate block has area U(min_patches, budget) and an aspect ratio
    log-uniform in [min_aspect, 1/min_aspect]. It is accepted if it lies strictly inside the grid (h', w'
    less than h, w) and adds between 1 and ``budget`` new patches, where budget is what is left of the count,
    at most ``max_patches``. An image stops early after 10 rejected candidates in a row, so it can end below
    its count, never above it. Each round draws one candidate per image for all images at once, on the CPU.
    The same generator state gives the same masks."""
    length = h * w
    if not 0 <= num_masked <= length:
        raise ValueError(f"cannot mask {num_masked} of {length} patches")
    max_patches = float(num_masked if max_patches is None else max_patches)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    done = torch.zeros(n, dtype=torch.long)  # (N,) patches masked so far
    fails = torch.zeros(n, dtype=torch.long)  # (N,) rejected candidates in a row
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    active = torch.full((n,), num_masked > 0)
    while active.any():
        u = torch.rand(4, n, dtype=torch.float64, generator=generator)  # (4, N) one candidate per image
        budget = (num_masked - done).double().clamp(max=max_patches)  # (N,)
        area = min_patches + (budget - min_patches) * u[0]  # random.uniform(min_patches, budget)
        aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
        bh = torch.round(torch.sqrt(area * aspect)).long()  # (N,) half to even, as Python's round
        bw = torch.round(torch.sqrt(area / aspect)).long()
        fits = (bh < h) & (bw < w)
        top = (u[2] * (h - bh + 1)).long().clamp(0, h - 1)  # random.randint(0, h - bh)
        left = (u[3] * (w - bw + 1)).long().clamp(0, w - 1)
        block = ((rows >= top.view(n, 1, 1)) & (rows < (top + bh).view(n, 1, 1))
                 & (cols >= left.view(n, 1, 1)) & (cols < (left + bw).view(n, 1, 1)))  # (N, h, w)
        new = (block & ~mask).sum(dim=(1, 2))  # (N,) patches the block would add
        accept = active & fits & (new > 0) & (new <= budget)
        mask |= block & accept.view(n, 1, 1)
        done += torch.where(accept, new, 0)
        fails = torch.where(accept, 0, fails + active.long())
        active = (done < num_masked) & (fails < 10)
    return mask.view(n, length)


# --- the ViT, part by part ----------------------------------------------------------------------------

VIT_PARTS = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm")


def require_vit(backbone: nn.Module) -> None:
    """A one-line error unless the backbone is a ViT with patch tokens (the attributes of ``VIT_PARTS``)."""
    missing = [a for a in VIT_PARTS if getattr(backbone, a, None) is None]
    if missing:
        raise ValueError(f"data2vec needs a ViT with patch tokens (--backbone vit_tiny); "
                         f"{type(backbone).__name__} has no {', '.join(missing)}")


def vit_blocks(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None, keep: int = 0,
               output: str = "block") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the ViT on x (N, C, H, W) part by part. ``mask`` (N, L) bool replaces those patch embeddings by
    ``mask_token`` (1, D) before the position embeddings are added (official ``forward_features``). Returns
    the final tokens (N, 1 + L, D) after ``backbone.norm``, CLS first, and the outputs (N, 1 + L, D) of the
    last ``keep`` blocks, lowest first: ``"block"``, each block's output after its last residual connection
    (official ``'end'``), or ``"ffn"``, its FFN output before that connection (``'fc'``)."""
    if output not in ("block", "ffn"):
        raise ValueError(f"target_output {output!r}: expected 'block' or 'ffn'")
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"data2vec: images of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; the ViT "
                         f"has position embeddings for {backbone.pos_embed.shape[0]}")
    if mask is not None:
        t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)  # (N, L, D) mask tokens inside
    t = t + backbone.pos_embed.to(t.dtype)
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1).to(t.dtype), t], dim=1)  # (N, 1 + L, D)
    outputs = []
    first_kept = len(backbone.blocks) - keep
    for i, blk in enumerate(backbone.blocks):  # the harness's pre-norm Block, written out
        h = blk.norm1(t)
        t = t + blk.attn(h, h, h, need_weights=False)[0]  # (N, 1 + L, D) after the attention residual
        ffn = blk.mlp(blk.norm2(t))  # (N, 1 + L, D) the FFN output before the last residual connection
        t = t + ffn  # (N, 1 + L, D) the block's output
        if i >= first_kept:
            outputs.append(t if output == "block" else ffn)
    return backbone.norm(t), outputs


# --- targets and loss ---------------------------------------------------------------------------------


def teacher_targets(layers: list[torch.Tensor], norm: str = "layer", post_layer_norm: bool = True) -> torch.Tensor:
    """y (N, L, D) from the K top blocks' patch tokens, K x (N, L, D) (Sec. 3.3; official
    ``train_one_epoch``): each block normalised without affine parameters (``"layer"``: per token over D;
    ``"instance"``: per image and channel over the L patches; ``"none"``), averaged, and layer-normalised again
    if ``post_layer_norm``. Computed in float32 at least, as officially (``.float()``)."""
    if norm not in ("layer", "instance", "none"):
        raise ValueError(f"target_norm {norm!r}: expected 'layer', 'instance' or 'none'")
    d = layers[0].shape[-1]
    total = 0
    for a in layers:
        a = a.to(torch.promote_types(a.dtype, torch.float32))  # (N, L, D)
        if norm == "instance":
            a = F.instance_norm(a.transpose(1, 2)).transpose(1, 2)  # over L, per (image, channel)
        elif norm == "layer":
            a = F.layer_norm(a, (d,))  # over D, per token
        total = total + a
    y = total / len(layers)  # (N, L, D)
    return F.layer_norm(y, (d,)) if post_layer_norm else y


def data2vec_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth L1 between the regression head's predictions and the targets at the masked patches, pred and
    target (M, D), averaged over the M x D values (Sec. 3.3; official ``F.smooth_l1_loss(beta=l1_beta)``):
    e^2 / (2 beta) where |e| <= beta, else |e| - beta / 2. No masked patch gives 0 (connected to pred)."""
    if pred.numel() == 0:
        return pred.sum()
    return F.smooth_l1_loss(pred, target.detach(), beta=beta)


def ema_decay(step: int, cfg: Config) -> float:
    """tau after ``step`` updates: linear from tau_0 to tau_e over the first tau_n updates, then tau_e
    (Sec. 3.2; official ``cur_decay``)."""
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


class Data2Vec(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        require_vit(backbone)
        depth = len(backbone.blocks)
        if not 1 <= cfg.top_k_blocks <= depth:
            raise ValueError(f"top_k_blocks {cfg.top_k_blocks}: the ViT has {depth} blocks")
        self.cfg = cfg
        self.backbone = backbone  # the student
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)  # EMA, same initial weights
        self.mask_token = nn.Parameter(torch.zeros(1, feature_dim))  # replaces masked patch embeddings
        self.head = nn.Linear(feature_dim, feature_dim)  # the linear regression head (official ``lm_head``)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # official trunc_normal_(a=-std, b=std)
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(self.head.bias)
        self.momentum = ema_decay(0, cfg)  # tau of the next update, recomputed from the step (no state)

    def setup(self, num_samples: int, num_classes: int) -> None:
        require_vit(self.backbone)

    def param_groups(self) -> list[dict]:
        """BEiT's ``get_parameter_groups``, which the official vision code uses: no weight decay on 1-d
        parameters (biases, norms) or the CLS token (``no_weight_decay``), decay on the rest, the mask token
        included. The teacher is left out (no gradient)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name == "backbone.cls_token" else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def draw_masks(self, n: int) -> torch.Tensor:
        """(N, L) bool masks on the CPU, from torch's global RNG."""
        cfg, length = self.cfg, self.backbone.pos_embed.shape[0]
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"data2vec's block masks need a square patch grid, got {length} patches")
        return block_masking(n, side, side, round(cfg.mask_ratio * length), cfg.mask_min_patches,
                             cfg.mask_max_fraction * length, cfg.mask_min_aspect)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x = batch["views"][0]  # (N, C, H, W), the same view for teacher and student
        mask = self.draw_masks(len(x)).to(x.device)  # (N, L)
        with torch.no_grad():  # the teacher sees the image unmasked
            _, top = vit_blocks(self.teacher, x, keep=cfg.top_k_blocks, output=cfg.target_output)
            y = teacher_targets([a[:, 1:] for a in top], cfg.target_norm, cfg.post_target_layer_norm)  # (N, L, D)
            y = y[mask]  # (M, D) the masked patches, row-major
        s, _ = vit_blocks(self.backbone, x, mask, self.mask_token)  # (N, 1 + L, D) after the final norm
        pred = self.head(s[:, 1:][mask])  # (M, D)
        loss = data2vec_loss(pred.float(), y, cfg.loss_beta)
        with torch.no_grad():
            target_var = y.var(dim=0).mean() if len(y) > 1 else y.new_zeros(())
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
        """The official linear classifier's features (``--linear_classifier`` with mean pooling): the
        student's last-block patch tokens, averaged, layer-normalised without affine parameters. (N, D)"""
        _, (last,) = vit_blocks(self.backbone, x, keep=1)  # (N, 1 + L, D)
        pooled = last[:, 1:].mean(dim=1)  # (N, D)
        return F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)  # official fc_norm: LayerNorm(eps=1e-6)


MODEL = Data2Vec


if __name__ == "__main__":
    m = block_masking(2, 14, 14, 118, generator=torch.Generator().manual_seed(0))
    print("masked per image:", m.sum(1).tolist())
    print(m[0].view(14, 14).int())
