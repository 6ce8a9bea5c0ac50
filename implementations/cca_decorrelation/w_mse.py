"""W-MSE — Ermolov, Siarohin, Sangineto, Sebe. "Whitening for Self-Supervised Representation Learning".
ICML 2021, arXiv:2007.06346. Catalog id: ``w-mse``. Official code: https://github.com/htdt/self-supervised
(``methods/w_mse.py``, ``methods/whitening.py``, ``cfg.py``; the README's commands for Table 1).

Each of N images gives d augmented views; v = g(f(x)) is the D-dimensional projection of a view. The
paper's objective (Eq. 1) asks positives to be close while the embeddings have identity covariance:

    min E[dist(z_i, z_j)]  subject to  cov(z_i, z_i) = cov(z_j, z_j) = I.

The constraint is met by construction. The N images are split at random into sub-batches of m = w_size
images; within a sub-batch, each view's m projections V are whitened on their own (the official
``methods/w_mse.py`` whitens the sub-batch's rows of each view apart, with the same images in every view):

    mu = mean(V),  Sigma = (1 - eps) cov(V) + eps I,  Sigma = L L^T (Cholesky),  z = L^{-1} (v - mu),

so that W = L^{-1} satisfies W^T W = Sigma^{-1} and the whitened sub-batch has identity covariance
(cov with the m - 1 denominator and eps = 0, as the official ``Whitening2d``). Then

    L_W-MSE = 2 / (N d (d - 1)) sum_{positive pairs (i, j)} || z_i / ||z_i|| - z_j / ||z_j|| ||^2,

the mean over the d(d-1)/2 view pairs of every image. With ``w_iter`` > 1 the split is drawn again with
a new random permutation and the losses are averaged (the official ``--w_iter``).

Collapse: no negatives, no asymmetry. Whitening scatters every sub-batch to identity covariance, so the
whitened embeddings of different images cannot coincide whatever the encoder outputs; what is left to
learn is which of the whitened directions the views of an image share. A (near-)constant projection does
not lower the loss: its residual noise is whitened to unit variance, and independent noise in two views
scores ~2, the value of unrelated unit vectors.

Distributed: the sub-batches are drawn from the GLOBAL batch. The projections are all-gathered with
gradient, the permutation is drawn on rank 0 and broadcast (the harness seeds each rank differently), and
every rank computes the same global loss. The gather's backward sums the world_size identical gradients
of each rank's slice and DDP averages over ranks, which cancel, so loss and gradients equal one process
on the concatenated batch.

Deviations:
- the head's last Linear has no bias: the whitening subtracts the sub-batch mean, so the bias cannot change
  the loss; its gradient is float noise, which Adam would turn into a random walk of size lr per step;
- a batch that w_size does not divide is split into N // w_size sub-batches of nearly equal size (the
  official code requires w_size to divide the batch);
- the whitening and the loss run in float64 with autocast off (the official code: float32). Cholesky has
  no bf16/fp16 kernels, and a covariance estimated from m ~ 2D samples can be ill-conditioned; float64
  keeps its factor and the gradient through it accurate (in the 2-rank check it halves the float noise
  against one process) at a negligible cost: D x D matrices from (m, D) sub-batches;
- optimizer: AdamW with weight decay 1e-6 instead of Adam with an L2 term of 1e-6 (the harness offers
  AdamW; at 1e-6 the two hardly differ); the schedule is the harness's linear warm-up and cosine decay
  instead of the official 500-iteration warm-up and x0.2 steps 50 and 25 epochs before the end;
- the view recipe puts crop and flip first (the order the harness runs batched): the official order is
  jitter, grayscale, crop, flip. Brightness, saturation, hue and grayscale act per pixel; contrast blends
  with the mean grey of the crop instead of the whole image. The crop interpolates bilinearly (the
  official uses bicubic, which the batched views do not offer);
- the official ``--no_norm`` variant (plain MSE between whitened vectors) is not included.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    num_views: int = 2
    """d, positives per image: 2 (W-MSE 2) is the official ``--num_samples`` default; 4 (W-MSE 4, with
    batch 256) gives the paper's best results (Table 1, README commands)."""
    proj_hidden_dim: int = 1024
    """Hidden width of the 2-layer head g (official ``--head_size 1024``, ``--head_layers 2``, BN on)."""
    proj_dim: int = 64
    """D, the embedding size: 64 for CIFAR-10/100 (official README, ``--emb 64``); 128 for STL-10, Tiny
    ImageNet and ImageNet-100."""
    w_size: int = 128
    """m, images per whitening sub-batch: 128 for CIFAR (official ``--w_size`` default and README); 256 for
    STL-10, Tiny ImageNet and ImageNet-100. Must exceed D for a full-rank covariance when w_eps = 0."""
    w_iter: int = 1
    """Random splits per step, losses averaged (official ``--w_iter`` default 1, the README's CIFAR
    commands; 4 for W-MSE 2 on STL-10 and Tiny ImageNet)."""
    w_eps: float = 0.0
    """Shrinkage of the covariance towards I before the Cholesky factorisation (official ``--w_eps``,
    default 0)."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official ``--crop_s0``; 0.08 for ImageNet-100)."""
    colour_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """Brightness, contrast, saturation, hue (official ``--cj0``..``--cj3``; 0.8, 0.8, 0.8, 0.2 for ImageNet-100)."""
    jitter_p: float = 0.8
    """Probability of the colour jitter (official ``--cj_p``)."""
    grayscale_p: float = 0.1
    """Probability of grayscale (official ``--gs_p``; 0.2 for ImageNet-100)."""
    optimizer: str = "adamw"
    """Adam in the official code (``train.py``); AdamW here, see Deviations."""
    base_lr: float = 1.5e-3
    """Per 256 images: 3e-3 at the official batch of 512 (README, CIFAR-10/100; 2e-3 for STL-10, Tiny
    ImageNet and ImageNet-100). The official code does not scale the rate with the batch."""
    weight_decay: float = 1e-6
    """Official ``--adam_l2``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's defaults; the official code does not set them."""
    warmup_epochs: int = 5
    """The official warm-up is 500 iterations (``train.py``): about 5 epochs of CIFAR-10 at batch 512."""
    epochs: int = 1000
    """CIFAR-10/100 and Tiny ImageNet (README); 2000 for STL-10, 240 for ImageNet-100."""
    batch_size: int = 512
    """N images (official ``--bs`` default, kept by the README's W-MSE 2 commands; 256 for W-MSE 4)."""
    sync_batchnorm: bool = True
    """The official code trains on one GPU (README), where BN sees the whole batch; SyncBatchNorm keeps
    that under torchrun."""


# Small-scale preset for CPU runs on the embedded digits (15 epochs at batch 64, small_cnn):
# - proj_dim 32, w_size 64: the whole batch of 64 is one sub-batch, m = 2D as in the official CIFAR
#   setting (D 64, m 128); a full-rank covariance needs m > D. D 16 with two sub-batches of 32: k-NN 84.2%;
# - base_lr 0.04: lr = 1e-2 at batch 64; with the official rate (3e-3, base_lr 0.012) the loss was still
#   falling at the end (k-NN 87.2%), with 1e-2 90.3% (random init 83.9%);
# - warmup_epochs 1: 5 would be a third of the run;
# - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (the official 0.2: 86.9%).
PRESETS = {"small": dict(proj_dim=32, w_size=64, base_lr=0.04, warmup_epochs=1, min_scale=0.4)}


# --- augmentations (official datasets/transforms.py) ---------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)) -> list[v2.Compose]:
    """d views from one distribution: crop (scale min_scale..1), flip, colour jitter (p=0.8), grayscale
    (p=0.1); a Gaussian blur (p=0.5, sigma 0.1..2) only at ImageNet sizes, as the official ImageNet-100
    recipe (its 32 px CIFAR and 64 px STL-10 recipes have none). Each view takes a PIL image or a uint8 tensor."""
    b, c, s, h = cfg.colour_jitter
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=cfg.jitter_p),
        v2.RandomGrayscale(p=cfg.grayscale_p),
    ]
    if image_size > 64:
        kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps) for _ in range(cfg.num_views)]


# --- heads ----------------------------------------------------------------------------------------


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """g: Linear - BN - ReLU - Linear (official ``model.get_head`` with 2 layers and BN); the last Linear
    has no bias, which the whitening's centring removes (see Deviations)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim, bias=False)
    )


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


def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Cholesky whitening of each set of m rows: (..., m, D) -> (..., m, D) with identity covariance.
    z = L^{-1} (x - mu), L L^T = (1 - eps) cov(x) + eps I (official ``Whitening2d``)."""
    m, d = x.shape[-2:]
    xc = x - x.mean(dim=-2, keepdim=True)  # (..., m, D)
    cov = xc.mT @ xc / (m - 1)  # (..., D, D), unbiased
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    chol = torch.linalg.cholesky((1 - eps) * cov + eps * eye)  # (..., D, D) lower triangular L
    return torch.linalg.solve_triangular(chol, xc.mT, upper=False).mT  # (..., m, D): rows of L^{-1} (x - mu)


def sub_batches(perm: torch.Tensor, w_size: int) -> tuple[torch.Tensor, ...]:
    """The images of a random order split into N // w_size sub-batches (at least one) of nearly equal size."""
    return perm.tensor_split(max(1, perm.numel() // w_size))


def w_mse(v: torch.Tensor, perms: Sequence[torch.Tensor], w_size: int, eps: float = 0.0) -> torch.Tensor:
    """The W-MSE loss of the whole batch. v: (N, V, D) projections of V views of N images; perms: one
    random order of the N images per whitening iteration (each gives a split into sub-batches)."""
    n, num_views, d = v.shape
    if eps == 0 and n // max(1, n // w_size) <= d:
        raise ValueError(f"W-MSE: sub-batches of {n // max(1, n // w_size)} images cannot be whitened in {d} dimensions "
                         "(the covariance needs more samples than dimensions): raise w_size or the batch, lower proj_dim, "
                         "or set w_eps > 0")
    pairs = list(itertools.combinations(range(num_views), 2))
    total = v.new_zeros(())
    for perm in perms:
        for idx in sub_batches(perm, w_size):
            z = F.normalize(whiten(v[idx].transpose(0, 1), eps), dim=-1)  # (V, m, D): each view whitened apart
            for i, j in pairs:
                total = total + (z[i] - z[j]).pow(2).sum()  # squared distances of the m positive pairs
    return total / (len(perms) * len(pairs) * n)  # 2 / (N d (d-1)) sum over pairs, averaged over iterations


def shared_permutation(n: int, device: torch.device) -> torch.Tensor:
    """A random order of the n images of the global batch, the same on every rank (rank 0's, broadcast)."""
    perm = torch.randperm(n, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(perm, src=0)
    return perm


def w_mse_loss(v: torch.Tensor, w_size: int, w_iter: int, eps: float = 0.0) -> torch.Tensor:
    """W-MSE over the global batch. v: (n, V, D) this rank's projections; the same value on every rank,
    computed in float64 and returned in v's dtype (float32 for bf16/fp16)."""
    with torch.autocast(device_type=v.device.type, enabled=False):
        v_all, _ = gather_with_grad(v)  # (N, V, D), N = n x world_size
        perms = [shared_permutation(v_all.shape[0], v_all.device) for _ in range(w_iter)]
        return w_mse(v_all.double(), perms, w_size, eps).to(torch.promote_types(v.dtype, torch.float32))


# --- model ----------------------------------------------------------------------------------------


class WMSE(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.num_views < 2:
            raise ValueError(f"W-MSE needs at least 2 views per image (positive pairs), got num_views={cfg.num_views}")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    def forward(self, batch: dict) -> dict:
        views = batch["views"]  # V tensors (n, C, H, W)
        # the encoder sees each view apart (BN statistics per view), the head all of them at once (official)
        h = torch.cat([self.backbone(x) for x in views])  # (V n, F)
        v = self.projector(h).unflatten(0, (len(views), -1)).transpose(0, 1)  # (n, V, D)
        loss = w_mse_loss(v, self.cfg.w_size, self.cfg.w_iter, self.cfg.w_eps)
        with torch.no_grad():
            pos_sim = F.cosine_similarity(v[:, 0], v[:, 1], dim=-1).mean()  # before whitening
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's representation h = f(x): the official evaluation uses it (the head only with
        ``--eval_head``)."""
        return self.backbone(x)


MODEL = WMSE


if __name__ == "__main__":
    v = torch.randn(256, 2, 64)
    print("random:", w_mse_loss(v, 128, 1).item(), "aligned:", w_mse_loss(v[:, :1].expand(-1, 2, -1), 128, 1).item())
