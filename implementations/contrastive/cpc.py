"""CPC — van den Oord, Li, Vinyals. "Representation Learning with Contrastive Predictive Coding".
arXiv preprint 2018, arXiv:1807.03748. Catalog id: ``cpc``. The image setting (Sec. 3.2, Fig. 4). No official
code was released for it.

Each view is cut into a G x G grid of overlapping P x P patches (Sec. 3.2: a 256 px image, 7 x 7 patches of
64 px with 32 px overlap; here P and the stride are fractions of the view size, 8 px and 4 px at 32 px),
with ``unfold`` inside ``forward``, after the standard view transforms. The encoder g_enc (the backbone,
mean-pooled) maps every patch to z_{i,j} (D); an autoregressive model g_ar over the rows (a PixelCNN-style
stack, Sec. 3.2) gives a context c_{i,j} = g_ar(z_{<=i}) that sees rows <= i only.
Row i predicts the patch k rows below it, in the same column, for k = 1..K (K = 5, Sec. 3.2), with the
log-bilinear score of Eq. 3, one W_k per offset,

    f_k(z, c_{i,j}) = exp(z^T W_k c_{i,j}),

and InfoNCE (Eq. 4) classifies the true patch z_{i+k,j} among a set X of candidates:

    L_k = -mean_{n, i + k < G, j}  log  f_k(z_{n,i+k,j}, c_{n,i,j}) / sum_{z' in X} f_k(z', c_{n,i,j}),
    L   = sum_{k=1..K} L_k.

X is every patch latent of the batch: N_global G^2 candidates, i.e. the positive and, as negatives, the other
G^2 - 1 patches of the same image (all positions, rows above and below included) and all G^2 patches of every
other image of the global batch.

Collapse: the loss is a softmax over N_global G^2 candidates; a constant encoder gives every candidate the
same score, so each L_k is log(N_global G^2), the loss of guessing; only patch latents that differ, in a way
the context can predict, lower it.

Distributed: the candidates X come from the global batch. The latents are all-gathered with gradient across
ranks, each rank scores the predictions of its own images against every latent, and as every rank holds the
same number of predictions, the mean over ranks is the loss of the concatenated batch. The per-patch sub-crop
offsets are drawn for the global batch from the step RNG and each rank keeps its rows (as InstDisc draws its
noise): with the same seed on every rank the draw is that of one process.

Deviations:
- the encoder is the harness's backbone applied to every patch as one batch (the paper: ResNet-v2-101 up to
  its third residual stack, mean-pooled, 1024-d). The paper uses no BatchNorm; the harness's backbones have
  it, and in training mode its statistics are shared by all patches of a (per-rank) batch, a path between
  patches that the paper's encoder lacked (CPC v2, Henaff et al., replaces BN by layer norm for this reason);
- the PixelCNN is not specified beyond "PixelCNN-style" (Sec. 3.2, ref. [19]); this file uses the residual
  blocks of CPC v2's pseudo-code: 1x1 conv, 1x3 conv along the row, a 2x1 conv over the row above and the
  row itself, 1x1 conv. The paper names a row-GRU PixelRNN as equally good; the masked convolution is chosen
  because every row is computed at once and causality holds by construction (no loop over rows);
- the K losses are summed (not stated; CPC v2's pseudo-code sums its offsets);
- "randomly cropped from a 300x300 image" is a RandomResizedCrop of fixed area (256/300)^2 and aspect 1,
  resized back to the view size: the same crop when images are first resized to 300/256 of the view size;
- the 60/64 sub-crop of each patch is padded back to P x P around the centre (the paper does not say where);
- ``embed`` converts to greyscale as the views are (``greyscale=True``), so that evaluation sees what
  training saw, and (``centre_embedding=True``) subtracts the mean embedding of the training set, recomputed
  in ``on_epoch_start`` from the harness's evaluation-transform features (one pass over the training set per
  epoch). The paper's linear classifier, which has a bias, is indifferent to that shift; the harness's
  cosine k-NN is not, and Eq. 3 leaves the mean of the latents free: adding one vector to every z adds the
  same term to all logits of a prediction. With ReLU features the shared part dwarfs the spread about it
  (see the small preset's notes);
- learning rate: the harness decays it with a cosine (the paper gives only Adam at 2e-4); epochs are not
  stated in the paper.

Cost: the backbone runs on N G^2 patches (49 per image at the paper's geometry) and each of the
N (G - k) G predictions of offset k is scored against all N_global G^2 latents.
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
    patch_fraction: float = 0.25
    """Patch side P over the view side: 64 px patches of a 256 px image (Sec. 3.2)."""
    patch_overlap: float = 0.5
    """Overlap of neighbouring patches over P: 32 px of 64 (Sec. 3.2; Fig. 4, "50% overlap"), stride P/2."""
    patch_crop: float = 60 / 64
    """Side of the random sub-crop of each patch over P, padded back to P (Sec. 3.2: 60x60 of 64x64)."""
    max_offset: int = 5
    """K: rows below predicted, k = 1..K, each with its own W_k (Sec. 3.2: "up to five rows"; Eq. 3)."""
    context_blocks: int = 5
    """Residual blocks of the PixelCNN context network; not stated in the paper (CPC v2 pseudo-code: 5)."""
    context_hidden_dim: int = 256
    """Width inside each block; not stated in the paper (CPC v2 pseudo-code: 256)."""
    crop_scale: float = (256 / 300) ** 2
    """Area fraction of the random square crop: 256 px out of 300 (Sec. 3.2)."""
    greyscale: bool = True
    """Views converted to greyscale (Sec. 3.2)."""
    centre_embedding: bool = True
    """Not in the paper: ``embed`` subtracts the mean embedding of the training set, recomputed at every
    epoch start (see Deviations); False gives the paper's mean-pooled features unchanged."""
    optimizer: str = "adamw"
    """Adam (Sec. 3.2); with weight_decay 0, AdamW is Adam."""
    base_lr: float = 1e-4
    """Per 256 images: Adam at 2e-4 for a batch of 512 (Sec. 3.2: 32 GPUs x 16)."""
    weight_decay: float = 0.0
    """Not stated in the paper (plain Adam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Not stated in the paper: Adam's defaults."""
    warmup_epochs: int = 0
    """Not stated in the paper: none."""
    epochs: int = 100
    """Not stated in the paper (nor the number of updates); 100 is this file's choice."""
    batch_size: int = 512
    """32 GPUs, each with a batch of 16 (Sec. 3.2)."""
    sync_batchnorm: bool = False
    """The paper's encoder has no BatchNorm (Sec. 3.2); the harness's backbones keep theirs per GPU."""


# Small-scale preset for CPU runs on the embedded digits (1,437 images of 32 px, 330 steps at batch 64).
# Figures from `selfsup train cpc --set ...`: k-NN of the plain mean-pooled latents (the paper's features) /
# k-NN of the same less their training-set mean (computed on the run's final checkpoint; what
# ``centre_embedding`` gives) / linear probe. Random init, full-image features: 83.9% k-NN, 98.6% linear
# (benchmarks/results/knn-digits.json); this file's mean-pooled patch latents at the 3x3 grid: 78.1%, 97.2%.
# - patch_fraction 0.5 (16 px patches, stride 8: a 3x3 grid with the paper's 50% overlap), max_offset 2 (all
#   that three rows allow): a digit is an 8x8 image upscaled, so the paper's 8 px patches at 32 px hold 2x2 of
#   its pixels, and their mean carries little shape. 7x7 grid of 8 px (max_offset 5): 58.6% / 61.1% / 96.1%;
#   5x5 grid of 16 px (stride 4, max_offset 4): 74.7% / 83.3% / 98.6%; 3x3 grid of 16 px: 79.2% / 86.7% /
#   97.5%;
# - base_lr 1e-3 (Adam at 2.5e-4 at batch 64, 10 times the paper's rate per image; the paper's was not
#   tried); 4e-3 gives 75.6% / 86.4% / 98.1%;
# - context_blocks 2, context_hidden_dim 128: two blocks already see every row above on a 3-row grid (not
#   compared with the default 5 x 256).
# The plain k-NN stays near or below its own random init while the linear probe gains on it: z^T W_k c does
# not change when every latent moves by the same vector, so nothing in the loss sets the mean of z, and these
# ReLU features keep a shared component 3.5 times their spread about it, which the cosine k-NN mostly sees.
PRESETS = {
    "small": dict(patch_fraction=0.5, max_offset=2, context_blocks=2, context_hidden_dim=128, base_lr=1e-3),
}


# --- augmentations (Sec. 3.2) ----------------------------------------------------------------------


def augmentations(
    cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
) -> list[v2.Compose]:
    """One view per image: a random square crop of (256/300)^2 of the area, a flip (p=0.5) and greyscale
    (Sec. 3.2). The patch grid and each patch's sub-crop are made from the view in ``forward``."""
    area = (cfg.crop_scale, cfg.crop_scale)
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=area, ratio=(1.0, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if cfg.greyscale:
        steps.append(v2.RandomGrayscale(p=1.0))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps)]


# --- the patch grid (Sec. 3.2, Fig. 4) ---------------------------------------------------------------


def patch_geometry(image_size: int, cfg: Config) -> tuple[int, int]:
    """(patch side P, stride) for a view of ``image_size`` px: 64 and 32 at 256 px, 8 and 4 at 32 px."""
    patch = max(1, round(image_size * cfg.patch_fraction))
    return patch, max(1, patch - round(patch * cfg.patch_overlap))


def patch_grid(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """The overlapping patches of x (N, C, H, W) in raster order: (N, G, G, C, P, P); pixels beyond the last
    whole patch are left out."""
    p = x.unfold(2, patch, stride).unfold(3, patch, stride)  # (N, C, G, G, P, P)
    return p.permute(0, 2, 3, 1, 4, 5)


def jitter_patches(p: torch.Tensor, size: int, offsets: torch.Tensor) -> torch.Tensor:
    """Each patch's size x size sub-crop at its (row, col) offset, padded back to P x P around the centre with
    zeros, the data set's mean after Normalize (Sec. 3.2). p: (B, C, P, P); offsets: (B, 2) in [0, P-size]."""
    b, c, side, _ = p.shape
    pos = torch.arange(side, device=p.device) - (side - size) // 2  # (P,) position inside the sub-crop
    inside = (pos >= 0) & (pos < size)
    rows = (offsets[:, :1] + pos).clamp(0, side - 1)  # (B, P) source row of every output row
    cols = (offsets[:, 1:] + pos).clamp(0, side - 1)
    out = p.gather(2, rows[:, None, :, None].expand(b, c, side, side))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, side, side))
    return out * (inside[:, None] & inside[None, :])


def draw_offsets(n_local: int, grid: int, high: int, device: torch.device) -> torch.Tensor:
    """(n_local, G, G, 2) sub-crop offsets in [0, high]: this rank's rows of a draw for the global batch."""
    world, rank = 1, 0
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    off = torch.randint(high + 1, (world * n_local, grid, grid, 2), device=device)
    return off[rank * n_local : (rank + 1) * n_local]


# --- the autoregressive context network (Sec. 3.2: PixelCNN-style) -----------------------------------


class ContextBlock(nn.Module):
    """A residual block whose output at row i depends on rows i - 1 and i only (any column of them)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv2d(dim, hidden, 1)
        self.conv_row = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))  # along the row
        self.conv_up = nn.Conv2d(hidden, hidden, (2, 1))  # the row above and the row itself
        self.conv_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_row(F.relu(self.conv_in(x)))  # (N, hidden, G, G)
        h = F.relu(self.conv_up(F.pad(h, (0, 0, 1, 0))))  # one row of zeros on top: no row below is seen
        return x + self.conv_out(h)


class ContextNetwork(nn.Module):
    """g_ar: latents z (N, D, G, G) -> contexts c (N, D, G, G), c at row i a function of rows <= i."""

    def __init__(self, dim: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*(ContextBlock(dim, hidden) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(z))


# --- loss ----------------------------------------------------------------------------------------------


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


def cpc_infonce(
    z: torch.Tensor, c: torch.Tensor, weights: list[torch.Tensor], offsets: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """InfoNCE (Eq. 4) of the row predictions, summed over the offsets. z: (N, G, G, D) patch latents of this
    rank's images; c: (N, G, G, Dc) their contexts; weights[i]: W_k (D, Dc) for k = offsets[i] (Eq. 3).
    Returns (loss, [L_k], accuracy of the top score over all predictions)."""
    n, g, _, d = z.shape
    candidates, first = gather_with_grad(z.reshape(n * g * g, d))  # (N_global G^2, D): X
    start = first + torch.arange(n, device=z.device) * g * g  # (N,) where each image's patches begin in X
    rows, cols = torch.arange(g, device=z.device), torch.arange(g, device=z.device)
    losses, hits, total = [], 0, 0
    for k, w in zip(offsets, weights):
        pred = c[:, : g - k] @ w.T  # (N, G-k, G, D): W_k c_{i,j} for the rows with a row k below
        logits = pred.reshape(-1, d) @ candidates.T  # (N (G-k) G, N_global G^2): log f_k (Eq. 3)
        target = start[:, None, None] + (rows[: g - k, None] + k) * g + cols  # (N, G-k, G): z_{i+k,j} in X
        losses.append(F.cross_entropy(logits, target.reshape(-1)))  # Eq. 4, mean over the predictions
        with torch.no_grad():
            hits += (logits.argmax(dim=1) == target.reshape(-1)).sum()
            total += logits.shape[0]
    return torch.stack(losses).sum(), losses, hits / total


# --- model ---------------------------------------------------------------------------------------------


class CPC(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone  # g_enc, on every patch
        self.context = ContextNetwork(feature_dim, cfg.context_hidden_dim, cfg.context_blocks)  # g_ar
        # W_k of Eq. 3, one per offset k = 1..K: z^T W_k c, a linear map without bias
        self.predictors = nn.ModuleList(
            nn.Linear(feature_dim, feature_dim, bias=False) for _ in range(cfg.max_offset)
        )
        self.register_buffer("latent_mean", torch.zeros(feature_dim))  # (D,) subtracted by embed
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # replaced by set_normalization

    def set_normalization(self, mean, std) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def encode_patches(self, x: torch.Tensor, jitter: bool) -> torch.Tensor:
        """Patch latents z (N, G, G, D) of views x (N, C, H, W): the backbone on all N G^2 patches at once."""
        patch, stride = patch_geometry(x.shape[-1], self.cfg)
        p = patch_grid(x, patch, stride)  # (N, G, G, C, P, P)
        n, g = p.shape[:2]
        p = p.reshape(n * g * g, *p.shape[3:])  # (N G^2, C, P, P)
        size = max(1, int(patch * self.cfg.patch_crop))
        if jitter and size < patch:
            offsets = draw_offsets(n, g, patch - size, x.device).reshape(-1, 2)  # (N G^2, 2)
            p = jitter_patches(p, size, offsets)
        return self.backbone(p).reshape(n, g, g, -1)  # (N, G, G, D)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        z = self.encode_patches(x, jitter=True)  # (N, G, G, D)
        g = z.shape[1]
        if self.cfg.max_offset >= g:
            raise ValueError(f"CPC: a {g}x{g} patch grid has no row {self.cfg.max_offset} rows below another")
        c = self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (N, G, G, D), row i sees rows <= i
        with torch.autocast(x.device.type, enabled=False):  # scores and the loss in float32
            weights = [w.weight.float() for w in self.predictors]
            offsets = list(range(1, self.cfg.max_offset + 1))
            loss, per_k, acc = cpc_infonce(z.float(), c.float(), weights, offsets)
        logs = {f"loss_k{k}": v.detach() for k, v in zip(offsets, per_k)}
        return {"loss": loss, "acc": acc, **logs}

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """The mean embedding of the training set under the evaluation transform, which ``embed`` subtracts
        from then on. ``features()`` embeds with the current mean already subtracted: the two add up."""
        if self.cfg.centre_embedding:
            self.latent_mean += features().mean(dim=0).to(self.latent_mean)  # (D,)

    def greyscale(self, x: torch.Tensor) -> torch.Tensor:
        """The luma of normalised RGB images, normalised again: what RandomGrayscale does before Normalize."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[:, None, None]
        luma = torch.tensor((0.2989, 0.587, 0.114), device=x.device, dtype=x.dtype)[:, None, None]
        grey = ((x * std + mean) * luma).sum(dim=1, keepdim=True)  # (N, 1, H, W)
        return (grey - mean) / std

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The patch latents mean-pooled over the grid (Sec. 3.2: the linear classifier is trained on the
        7x7x1024 encoder output mean-pooled to 1024-d), without sub-crops, less their mean over
        the training set (set in ``on_epoch_start``; zero at initialisation; a linear classifier with a bias
        is indifferent to it)."""
        if self.cfg.greyscale:
            x = self.greyscale(x)
        return self.encode_patches(x, jitter=False).mean(dim=(1, 2)) - self.latent_mean  # (N, D)


MODEL = CPC


if __name__ == "__main__":
    encoder = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    out = CPC(encoder, 16)({"views": [torch.randn(4, 3, 32, 32)]})
    print({k: round(v.item(), 3) for k, v in out.items()}, "collapsed: 5 log(4 * 49) =", 5 * math.log(4 * 49))
