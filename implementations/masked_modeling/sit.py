"""SiT — Atito, Awais, Kittler. "SiT: Self-supervised vIsion Transformer". arXiv preprint 2021,
arXiv:2104.03602 (v1, April 2021). Catalog id: ``atito-2021-sit``. Official code:
https://github.com/Sara-Ahmed/SiT (the v1 release, commit 1767b91 of 2021-04-20: ``engine.py``,
``losses.py``, ``vision_transformer_SiT.py``; the repository's later main branch is the revised GMML/EMA
recipe of the later arXiv versions, not this one).

A ViT gets two learnable tokens beside its patch tokens: a rotation token and a contrastive token. Each of
two augmented views is rotated by r in {0, 90, 180, 270} degrees and then corrupted (``corrupt``: a random
block turned grey, a random block blurred, random blocks dropped to Gaussian noise, random blocks replaced
by the same place of another image of the batch). From the corrupted view the transformer predicts

- the clean (rotated) image from its patch tokens, by a transposed convolution of kernel = stride = p;
- the rotation r from the rotation token, by a linear layer of 4 outputs;
- a 512-d embedding from the contrastive token, by a linear layer, contrasted between the two views.

With s_t one learnable log-variance per task (initialised at 1, official ``rot_w``, ``contrastive_w``,
``recons_w``), the objective (official ``MTLLOSS`` with ``LearnedLoss.calculate_weighted_loss``) is

    L = sum_t a_t exp(-s_t) L_t + s_t / 2,        a_rot = a_con = 1, a_rec = 1/2,
    L_rot = CE(rotation logits, r),     L_con = NT-Xent(z_1, z_2; t = 0.5),
    L_rec = 1/(2 N C H W) sum_{views, n, c, h, w} |x_hat - x|        (l1 over the WHOLE image),

a Kendall-Gal-Cipolla uncertainty weighting (the l1 term as a Laplace likelihood, hence a = 1/2). The
reconstruction is scored on every pixel, corrupted or not (the official ``nn.L1Loss()`` on the full
image; the mask ``corrupt`` returns is not used by the loss). NT-Xent is SimCLR's (the official
``ContrastiveLoss``: cosine similarities, every other embedding of the 2N in the denominator, mean over
the 2N anchors), so ``nt_xent`` is simclr.py's, copied.

Collapse: the contrastive term has the batch's other images as negatives; reconstruction of the input and
rotation classification cannot be solved by a constant representation either.

Distributed: the contrastive embeddings are gathered (with gradient) across ranks, as in simclr.py, so the
negatives come from the global batch; the other terms are per-sample means.

Backbone: the harness's ViT, walked part by part (``sit_tokens``): ``patch_embed`` (strided conv,
kernel = stride = p), the fixed ``pos_embed`` (L, D), ``cls_token`` used as the ROTATION token, a new
learnable contrastive token owned by the model, ``blocks`` and ``norm``. Another backbone is refused with a
one-line ValueError.

Features for evaluation: the rotation and contrastive tokens of the whole clean image, concatenated
(N, 2D). The official linear evaluation (``--SiT_LinearEvaluation 1``) freezes the backbone and trains a
linear classifier on each of the two tokens, summing their logits and losses: a linear map of this
concatenation.

Deviations:
- the extra tokens carry no position embedding (officially the learnable ``pos_embed`` covers them); the
  patches keep the harness's fixed sin-cos embeddings instead of learnable ones;
- rotation is applied inside ``forward`` to the augmented view (officially to the PIL image before the
  crop, flip and jitter); the two orders give the same distribution for square crops;
- the crop is resized bilinearly, not bicubically (timm's ``--train-interpolation bicubic``), so that it
  runs batched on the device;
- the blur kernel (odd, 3-15 px) is shrunk to fit a small block, which reflect padding needs (kornia's
  ``GaussianBlur2d`` officially, which would fail on blocks narrower than half the kernel);
- the contrastive negatives are gathered across ranks (the official loss uses each GPU's batch only);
- no stochastic depth (official ``--drop-path 0.1``) and no EMA of the model (``--model-ema``, kept for
  evaluation only): the harness's ViT has neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Config:
    contrastive_dim: int = 512
    """Output of the linear contrastive head on the contrastive token (official ``contrastive_head =
    nn.Linear(num_features, 512)``)."""
    temperature: float = 0.5
    """NT-Xent temperature (official ``losses.ContrastiveLoss``, temperature=0.5)."""
    rotate: bool = True
    """Rotate each view by a random multiple of 90 degrees and predict it (official ``RandomRotation``);
    off only for checks that need a deterministic forward."""
    gray_prob: float = 1.0
    """Probability of the grey-block corruption; always applied officially (``distortImages`` calls
    ``rgb2gray_patch`` on every image)."""
    blur_prob: float = 1.0
    """Probability of the blurred-block corruption; always applied officially (``smooth_patch``)."""
    max_blur_kernel: int = 15
    """Largest Gaussian kernel side (official ``smooth_patch(max_kernSz=15)``; sigma uniform in 0.1-5.1)."""
    max_noise_drop: float = 0.3
    """Blocks dropped to N(0, 1) noise cover at least U(0, 0.3) of the image (official
    ``drop_rand_patches(max_drop=0.3)``)."""
    max_replace_drop: float = 0.3
    """Blocks replaced from another image of the batch cover at least U(0, 0.3) of the image (the same
    function with ``X_rep``)."""
    max_block: float = 0.25
    """Largest side of one dropped or replaced block, as a fraction of the image side (``max_block_sz``)."""
    min_block: float = 0.05
    """Smallest side of any corrupted block, as a fraction of the image side (``tolr=0.05``)."""
    init_log_var: float = 1.0
    """Initial value of each task's learnable log-variance s_t (``nn.Parameter(torch.tensor([1.0]))``)."""
    min_scale: float = 0.08
    """Smallest area of the random resized crop (timm ``create_transform`` default scale=(0.08, 1))."""
    colour_jitter: float = 0.4
    """Brightness, contrast and saturation jitter, always applied (official ``--color-jitter 0.4``; timm:
    no hue); auto-augment, random erasing, mixup and cutmix are switched off for self-supervision."""
    optimizer: str = "adamw"
    """Official ``--opt adamw``."""
    base_lr: float = 2.5e-4
    """Per 256 images: the official ``--lr 5e-4`` is per 512 (``linear_scaled_lr = lr * batch / 512``);
    cosine schedule (``--sched cosine``)."""
    weight_decay: float = 0.05
    """Official ``--weight-decay 0.05``."""
    warmup_epochs: int = 5
    """Official ``--warmup-epochs 5``."""
    epochs: int = 501
    """Official ``--epochs 501`` (the small-data pretraining; the paper does not state an ImageNet run
    that the v1 code reproduces, unverified beyond the code's defaults)."""
    batch_size: int = 72
    """Official ``--batch-size 72`` per GPU; the number of GPUs is not stated (unverified)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 images, 330 steps at batch 64,
# ``--backbone vit_tiny``: 32 px, 4-px patches):
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets);
# - base_lr 1.5e-3, warm-up 2 epochs: 330 steps at the paper's rate hardly move the encoder (as mae.py);
# - contrastive_dim 128: the encoder is 192 wide; a 512-d head is wider than its input.
# Not trained on digits yet (no time in this session): the preset is untested against random init.
PRESETS = {"small": dict(min_scale=0.4, base_lr=1.5e-3, warmup_epochs=2, contrastive_dim=128)}


# --- augmentations (timm create_transform, as the official build_transform) ------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from the same pipeline: random resized crop (0.08-1), horizontal flip, colour jitter
    (0.4, 0.4, 0.4) (timm's training transform with auto-augment and erasing off). The rotation and the
    corruptions are drawn inside ``forward``. Each view is one v2 pipeline; it takes a PIL image or a uint8
    tensor."""
    j = cfg.colour_jitter
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(j, j, j),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- rotations and corruptions (official datasets_utils.RandomRotation, engine.distortImages) --------


def rotate_batch(images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, S, S) -> each image rotated counter-clockwise by k * 90 degrees (N, C, S, S), and k (N,) in
    {0, 1, 2, 3} drawn uniformly (PIL's ROTATE_90 is counter-clockwise, as ``torch.rot90`` on (H, W))."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation prediction needs square images, got {tuple(images.shape[-2:])}")
    k = torch.randint(0, 4, (len(images),), generator=generator)  # (N,)
    out = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(images, k)])
    return out, k.to(images.device)


def _randint(low: int, high: int, g: torch.Generator | None) -> int:
    """numpy's randint(low, high): uniform in [low, high), with an empty range read as {low}."""
    return int(torch.randint(low, max(high, low + 1), (1,), generator=g))


def _block(h: int, w: int, tol: tuple[int, int], most: tuple[int, int], g) -> tuple[int, int, int, int]:
    """A random block (r0, r1, c0, c1) as the official code draws it: corner in [0, side - tol), extent in
    [tol, most), clipped to the image."""
    r0, c0 = _randint(0, h - tol[0], g), _randint(0, w - tol[1], g)
    return r0, min(_randint(tol[0], most[0], g) + r0, h), c0, min(_randint(tol[1], most[1], g) + c0, w)


def corrupt(images: torch.Tensor, cfg: Config, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``distortImages``, per image n in order: one block of any size (sides from 5% to all of
    the image) turned grey (the channel mean), with probability ``gray_prob``; one such block blurred with
    an odd Gaussian kernel of 3-15 px and sigma in [0.1, 5.1), with probability ``blur_prob``; blocks of
    5%-25% of the side dropped to N(0, 1) until they add up to U(0, max_noise_drop) of the pixels; then, if
    a random other image j != n is drawn, blocks replaced by the same place of image j (as it is at that
    point of the loop) until they add up to U(0, max_replace_drop). images: (N, C, H, W), normalised.
    Returns the corrupted images (N, C, H, W) and the mask (N, 1, H, W) bool of every corrupted pixel.
    The same generator state gives the same corruption."""
    g = generator
    n, c, h, w = images.shape
    out = images.detach().clone()
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool, device=images.device)
    tol = (int(cfg.min_block * h), int(cfg.min_block * w))
    most = (int(cfg.max_block * h), int(cfg.max_block * w))

    def fill(i: int, fraction: float, source: torch.Tensor | None) -> None:
        target = float(torch.rand(1, generator=g)) * fraction * h * w
        total = 0
        while total < target:
            r0, r1, c0, c1 = _block(h, w, tol, most, g)
            if source is None:
                out[i, :, r0:r1, c0:c1] = torch.randn(c, r1 - r0, c1 - c0, generator=g).to(out)
            else:
                out[i, :, r0:r1, c0:c1] = source[:, r0:r1, c0:c1]
            mask[i, :, r0:r1, c0:c1] = True
            total += (r1 - r0) * (c1 - c0)

    for i in range(n):
        if float(torch.rand(1, generator=g)) < cfg.gray_prob:
            r0, r1, c0, c1 = _block(h, w, tol, (h, w), g)
            out[i, :, r0:r1, c0:c1] = out[i, :, r0:r1, c0:c1].mean(dim=0, keepdim=True)
            mask[i, :, r0:r1, c0:c1] = True
        if float(torch.rand(1, generator=g)) < cfg.blur_prob:
            size = 2 * (_randint(3, cfg.max_blur_kernel + 1, g) // 2) + 1
            sigma = float(torch.rand(1, generator=g)) * 5 + 0.1
            r0, r1, c0, c1 = _block(h, w, tol, (h, w), g)
            side = min(r1 - r0, c1 - c0)
            size = min(size, 2 * side - 1)  # reflect padding needs size // 2 < side
            if size >= 3:
                out[i, :, r0:r1, c0:c1] = TF.gaussian_blur(out[i, :, r0:r1, c0:c1], [size, size], [sigma, sigma])
                mask[i, :, r0:r1, c0:c1] = True
        fill(i, cfg.max_noise_drop, None)
        j = _randint(0, n, g)
        if j != i:
            fill(i, cfg.max_replace_drop, out[j].clone())
    return out, mask


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


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Eq. 1) averaged over the 2N anchors. z1, z2: (N, D) projections of the two views."""
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all1, offset = gather_with_grad(z1)  # (N_global, D)
    all2, _ = gather_with_grad(z2)
    keys = torch.cat([all1, all2])  # (2 N_global, D)
    queries = torch.cat([z1, z2])  # (2N, D)
    logits = queries @ keys.T / temperature  # (2N, 2 N_global)
    n_global = all1.shape[0]
    rows = torch.arange(2 * n, device=z1.device)
    local = torch.arange(n, device=z1.device) + offset
    self_col = torch.cat([local, local + n_global])  # where each query sits among the keys
    pos_col = torch.cat([local + n_global, local])  # its other view
    logits[rows, self_col] = float("-inf")  # k != i in the denominator
    return F.cross_entropy(logits, pos_col)


TASK_SCALE = (1.0, 1.0, 0.5)
"""a_t of (rotation, contrastive, reconstruction): ``LearnedLoss.adj`` (1 for cross-entropy and contrastive,
0.5 for the l1 loss)."""


def uncertainty_weighted(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """sum_t a_t exp(-s_t) L_t + s_t / 2. losses, log_vars: (3,) in the order (rotation, contrastive,
    reconstruction); a_t = TASK_SCALE (official ``calculate_weighted_loss`` of the v1 release)."""
    scale = torch.tensor(TASK_SCALE, dtype=losses.dtype, device=losses.device)  # (3,)
    return (scale * torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


def sit_losses(rot_logits: torch.Tensor, rot: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
               recon: torch.Tensor, clean: torch.Tensor, temperature: float) -> torch.Tensor:
    """The three task losses (3,): rotation cross-entropy (rot_logits (M, 4), rot (M,)), NT-Xent between
    z1, z2 (N, K), and the mean absolute error of recon against clean (M, C, H, W) over every pixel."""
    return torch.stack([F.cross_entropy(rot_logits, rot), nt_xent(z1, z2, temperature),
                        (recon - clean).abs().mean()])


# --- model ----------------------------------------------------------------------------------------


def patch_size(backbone: nn.Module) -> int:
    """The ViT's patch side, from its strided patch embedding; a one-line error for another backbone."""
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    parts = ("pos_embed", "cls_token", "blocks", "norm", "num_patches")
    if stride is None or not all(hasattr(backbone, a) for a in parts):
        raise ValueError(f"SiT needs a ViT with patch tokens (--backbone vit_tiny); {type(backbone).__name__} "
                         f"has no patch_embed, pos_embed, cls_token, blocks or norm")
    return int(stride[0])


def sit_tokens(vit: nn.Module, x: torch.Tensor, contrastive_token: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2 + L, D): [rotation token (the ViT's cls_token), contrastive token, patches]
    through the ViT's blocks and final norm; the patches carry the fixed position embeddings."""
    t = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed  # (N, L, D)
    n = len(t)
    t = torch.cat([vit.cls_token.expand(n, -1, -1), contrastive_token.expand(n, -1, -1), t], dim=1)
    for blk in vit.blocks:
        t = blk(t)
    return vit.norm(t)


class SiT(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.patch = patch_size(backbone)
        self.grid = int(round(backbone.num_patches**0.5))
        channels = backbone.patch_embed.in_channels
        self.contrastive_token = nn.Parameter(torch.zeros(1, 1, feature_dim))
        nn.init.trunc_normal_(self.contrastive_token, std=0.02)  # official trunc_normal_(std=.02)
        self.rot_head = nn.Linear(feature_dim, 4)
        self.contrastive_head = nn.Linear(feature_dim, cfg.contrastive_dim)
        self.recon_head = nn.ConvTranspose2d(feature_dim, channels, self.patch, stride=self.patch)
        self.log_vars = nn.Parameter(torch.full((3,), cfg.init_log_var))  # (rotation, contrastive, recon)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> rotation logits (N, 4), contrastive embedding (N, K), reconstruction (N, C, H, W)."""
        t = sit_tokens(self.backbone, x, self.contrastive_token)  # (N, 2 + L, D)
        patches = t[:, 2:].transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (N, D, h, w)
        return self.rot_head(t[:, 0]), self.contrastive_head(t[:, 1]), self.recon_head(patches)

    def forward(self, batch: dict) -> dict:
        outs, clean, rots = [], [], []
        for x in batch["views"][:2]:  # (N, C, H, W) each
            if self.cfg.rotate:
                x, r = rotate_batch(x)
            else:
                r = torch.zeros(len(x), dtype=torch.long, device=x.device)
            x_bad, _ = corrupt(x, self.cfg)
            outs.append(self.heads(x_bad))
            clean.append(x)
            rots.append(r)
        (r1, z1, x1), (r2, z2, x2) = outs
        losses = sit_losses(torch.cat([r1, r2]).float(), torch.cat(rots), z1.float(), z2.float(),
                            torch.cat([x1, x2]).float(), torch.cat(clean).float(), self.cfg.temperature)
        loss = uncertainty_weighted(losses, self.log_vars)
        return {"loss": loss, "rotation": losses[0].detach(), "contrastive": losses[1].detach(),
                "reconstruction": losses[2].detach()}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The rotation and contrastive tokens of the clean image, concatenated (N, 2D): the official linear
        evaluation's two linear heads read these two tokens and sum their logits."""
        t = sit_tokens(self.backbone, x, self.contrastive_token)
        return torch.cat([t[:, 0], t[:, 1]], dim=1)


MODEL = SiT


if __name__ == "__main__":
    imgs = torch.randn(4, 3, 32, 32)
    bad, m = corrupt(imgs, Config(), generator=torch.Generator().manual_seed(0))
    print("corrupted share per image:", m.float().mean((1, 2, 3)).tolist())
