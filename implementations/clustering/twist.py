"""TWIST — Wang, Kong, Zhang, Liu, Li. "Self-Supervised Learning by Estimating Twin Class Distributions".
IEEE Transactions on Image Processing 32 (2023), pp. 2228-2236; arXiv:2110.07402 (2021). Catalog id: ``twist``.
Official code: https://github.com/bytedance/TWIST (``objective.py`` ``EntLoss``, ``engine.py``, ``train.py``).

A Siamese network ends in a softmax over C pseudo-classes. The head g (a 3-layer MLP, then BatchNorm
without affine parameters on its C logits: official ``ProjectionHead`` with ``--lbn_type bn``) maps a view
x_v of image i to logits s_v,i, and its twin class distributions are

    p_v,i = softmax(s_v,i),        q_v,i = softmax(s_v,i / tau)   (tau = 1 by default, so q = p).

For a pair of views (a, b), over a batch of N images (official ``EntLoss``):

    L_ab = 1/2 [KL(a || b) + KL(b || a)]  +  (1 + lam1) 1/2 [EH(a) + EH(b)]  -  lam2 1/2 [HE(a) + HE(b)],
    KL(a || b) = 1/N sum_i sum_c p_a,i,c (log(p_a,i,c + eps) - log(p_b,i,c + eps)),    (consistency)
    EH(v)      = - 1/N sum_i sum_c q_v,i,c log(q_v,i,c + eps),                          (sharpness, minimised)
    HE(v)      = - sum_c m_v,c log(m_v,c + eps),   m_v = 1/N sum_i q_v,i,              (diversity, maximised)

with lam1 = 0, lam2 = 1: L = KL_sym + EH - HE. Minimising EH - HE maximises the mutual information between
the image and its class, I(x; c) = H(E_x p(c|x)) - E_x H(p(c|x)) (the paper's motivation). Multi-crop (the
paper's 75.5% ResNet-50 run: 2 global crops of 224 px and 12 local crops of 96 px, official defaults):
the global crop 0 is paired with every other view and the global crop 1 with every local crop (official
``--crops_interact_style sparse``: pairs (a, b) with a in {0, 1}, b > a, i.e. 2V - 3 pairs of V views), and
L is the mean of L_ab over these pairs. Every view goes through the same network, with gradients on both
sides of every pair: no stop-gradient, predictor or momentum encoder. The BN on the logits normalises
them over all views of the batch together (the head is applied to the concatenation of every crop, as in
the official ``TWIST.forward``).

Collapse: the consistency term alone is minimised by any constant distribution. A constant one-hot output
has EH = 0 but HE = 0, so it pays the full log C of the diversity term (the minimum of EH - HE is -log C,
reached by confident predictions spread evenly over the classes); a constant uniform output has HE = log C
but EH = log C, so the sharpness term cancels it. Only sharp, diverse and view-consistent outputs reach the
minimum -log C. The non-affine BN on the logits (official ``--lbn_type bn``) makes each class's logit
zero-mean and unit-variance over the batch, so that no class can dominate every sample. Logged:
``kl``, ``eh``, ``he`` and ``used_classes`` (the fraction of the C classes that are some sample's argmax).

Distributed: KL and EH are per-sample means, so DDP's averaging of gradients over ranks gives the global
batch's. HE is a function of the batch-mean distribution: the distributions of every view are gathered
across ranks with a differentiable all-gather (``gather_with_grad``, whose backward sums each slice's
gradient over ranks) and averaged over the global batch, so that two ranks give the loss and gradients of
one process on the concatenated batch. The BN layers (backbone, MLP and logits) are global with
SyncBatchNorm (official ``convert_sync_batchnorm`` on the backbone and ``nn.SyncBatchNorm`` in the head).

Deviations:
- the official code all-reduces KL, EH and the batch mean with a SUM and no division, so its logged loss
  on W processes is W times the one-process value (and HE is W (H(m) - log W)); its gradients are the
  global batch's anyway (the all-reduce is not differentiated: each rank backpropagates through its own
  mean, DDP averages; the log W constant is annihilated by the softmax). Here the mean over the global
  batch is taken exactly, so the loss value too equals one process's; the official ``eps`` in HE is W eps
  on the summed mean, i.e. eps on the global mean, as here;
- the official BN on the logits is synchronised over a "bunch" of 256 images (``--bunch-size 256``, two
  GPUs of 128) rather than the global batch; here it is an ordinary BatchNorm1d (affine=False), which the
  harness makes global with SyncBatchNorm (``sync_batchnorm``) or leaves per rank;
- the self-labeling stage (official: the last 50 of 850 epochs, ``--mme_epochs 800``: a confidence-thresholded
  cross-entropy on pseudo-labels from the more confident global crop, after SCAN, with a quantile schedule
  0.5 -> 0.6, its own learning rate 0.05 per 256 with 5 warm-up epochs and harder crops) is left out: it is
  a second training stage with its own objective, rate schedule and view recipe, which the harness (one
  objective, one schedule, one recipe per run) cannot switch to mid-run; ``epochs`` is the 800 epochs of the
  TWIST objective. The optional momentum encoder of the ViT scripts (``--use_momentum_encoder``) is left out
  too: the ResNet-50 setting does not use it;
- the harness's schedule: linear warm-up then a cosine to 0 (official: cosine to 0.001 of the peak);
  biases and BN parameters get no weight decay and no LARS adaptation (official ``lars_exclude`` on 1-d
  parameters, as here); no mixed precision (official ``--amp 1``);
- crops are resized bilinearly (official: bicubic) so that they run batched on the device, and the blur
  (official: PIL, radius 0.1-2) is a Gaussian kernel of 10% of the crop's side, dropped below 64 px (as
  SimCLR does for CIFAR-10).
"""

from __future__ import annotations

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
    num_classes: int = 4096
    """C, the number of pseudo-classes: the head's output width (official ``--dim 4096``, the default of
    the multi-crop runs; the two-crop single-node script uses ``--dim 32768``)."""
    proj_hidden_dim: int = 4096
    """Width of the head's two hidden layers, Linear-BN-ReLU twice (official ``--hid_dim 4096``)."""
    logit_bn: bool = True
    """BatchNorm without affine parameters on the C logits before the softmax (official ``--lbn_type bn``;
    ``identity`` drops it)."""
    tau: float = 1.0
    """Temperature of the distributions in the sharpness and diversity terms (official ``--tau 1.0``; the
    consistency term always uses temperature 1)."""
    lam1: float = 0.0
    """The sharpness term's weight is 1 + lam1 (official ``--lam1 0.0``; the ViT scripts use -0.6)."""
    lam2: float = 1.0
    """The diversity term's weight (official ``--lam2 1.0``)."""
    eps: float = 1e-5
    """Added to the probabilities inside every log (official ``--EPS 1e-5``)."""
    n_local_crops: int = 12
    """Low-resolution crops of multi-crop (official ``--local_crops_number 12``, with ``--aug multicrop``);
    0 for the two-crop setting."""
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    """Area range of the global crops (official ``--min1 0.4 --max1 1.0``)."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of the local crops (official ``--min2 0.05 --max2 0.4``)."""
    local_crop_ratio: float = 96 / 224
    """Side of a local crop over a global one: 96 px vs. 224 px (official ``MultiCropAugmentation``)."""
    optimizer: str = "lars"
    """LARS, momentum 0.9, 1-d parameters excluded from decay and adaptation (official ``--optim lars``,
    ``LARS_OPENSELF``, trust coefficient 0.001)."""
    base_lr: float = 0.5
    """Per 256 images, scaled linearly with the batch, then cosine (official ``--lr 0.5``)."""
    weight_decay: float = 1.5e-6
    """Official ``--weight-decay 1.5e-6`` (``--weight-decay-end`` is the same: constant)."""
    momentum: float = 0.9
    """SGD momentum (official ``LARS_OPENSELF(..., momentum=0.9)``)."""
    warmup_epochs: int = 10
    """Linear warm-up (official: 10 when epochs > 50, set in ``train.main``)."""
    epochs: int = 800
    """Epochs of the TWIST objective (official ``--mme_epochs 800`` of ``--epochs 850``: the last 50 are the
    self-labeling stage, left out here; see Deviations)."""
    batch_size: int = 2048
    """128 images on each of 16 GPUs (official ``--batch-size 128`` per GPU; README: 16 GPUs for the
    multi-crop ResNet-50 run)."""
    sync_batchnorm: bool = True
    """Official: the backbone converted to SyncBatchNorm, the head's BN layers SyncBatchNorm."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - epochs 15, warmup_epochs 1: the harness's budget; a one-epoch warm-up (the official code sets 3 for
#   runs of <= 20 epochs, a fifth of this one);
# - num_classes 40: 4 per digit, as 4096 is about 4 per ImageNet class; with a batch of 64 the diversity
#   term can still spread a batch over every class (4096 classes would leave most of them without a
#   sample, and HE could not reach log C);
# - proj_hidden_dim 512: the head sized to the small CNN's 256-d features;
# - n_local_crops 0 (the two global crops only, as in the paper's runs without multi-crop): with 4 local crops (scale
#   0.05-0.4 of an 8x8 digit, upscaled) 8 of the 9 pairs are global-local, their consistency term dominates
#   and the run settled at uniform distributions (EH = HE = log C, loss 0: k-NN 72.5% vs. 83.9% at random
#   init); two crops reached 84.2%, and are 3x cheaper per step;
# - tau 0.5 (official ``--tau``): the sharpness and diversity terms on sharper distributions, since the
#   BN'd logits of 40 classes (unit variance per class) give soft distributions at tau 1 (EH stayed at 3.3
#   of log 40 = 3.7); k-NN 85.8%, assign NMI 0.60 (0.53 at tau 1).
PRESETS = {
    "small": dict(epochs=15, warmup_epochs=1, num_classes=40, proj_hidden_dim=512, n_local_crops=0, tau=0.5),
}


# --- augmentations (official augmentation.py, MultiCropAugmentation) -------------------------------


def local_crop_size(cfg: Config, image_size: int) -> int:
    """The local crops' side: the 96/224 ratio rounded to a multiple of 8 (96 is one: six ViT-S/16 patches);
    16 px at 32 px, i.e. four 4-px patches, 2x2 after three poolings."""
    return max(8, 8 * round(image_size * cfg.local_crop_ratio / 8))


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """2 global crops, then M local crops, each its own v2 pipeline (official ``MultiCropAugmentation``, the
    BYOL/DINO recipe): random resized crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale
    p=0.2; the first global crop always blurred, the second blurred with p=0.1 and solarised with p=0.2,
    the local crops blurred with p=0.5. Each takes a PIL image or a uint8 tensor."""

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

    local = local_crop_size(cfg, image_size)
    first = make(image_size, cfg.global_crop_scale, 1.0, 0.0)
    second = make(image_size, cfg.global_crop_scale, 0.1, 0.2)
    return [first, second] + [make(local, cfg.local_crop_scale, 0.5, 0.0) for _ in range(cfg.n_local_crops)]


# --- backbone on crops of several sizes -----------------------------------------------------------


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


def multicrop_features(backbone: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """(V N, D) features of V views, one backbone call per run of consecutive views of the same
    resolution (official ``forward``: the 2 global crops together, then the local ones)."""
    feats, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        feats.append(encode(backbone, torch.cat(list(views[start:end]))))  # (k N, D)
        start = end
    return torch.cat(feats)


# --- the loss -------------------------------------------------------------------------------------


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


def sparse_pairs(n_views: int) -> list[tuple[int, int]]:
    """The view pairs of ``crops_interact_style sparse``: (a, b) with a a global crop (0 or 1) and b > a;
    2V - 3 pairs of V views ((0, 1) alone for two)."""
    return [(a, b) for a in range(min(2, n_views)) for b in range(a + 1, n_views)]


def twist_loss(logits: Sequence[torch.Tensor], tau: float = 1.0, lam1: float = 0.0, lam2: float = 1.0,
               eps: float = 1e-5, pairs: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """TWIST's objective (official ``EntLoss``) averaged over view pairs. logits: V x (N, C), this rank's
    head outputs of every view; pairs: indices into the views (default ``sparse_pairs(V)``). Returns the
    total ``loss`` = kl + (1 + lam1) eh - lam2 he and the pair-averaged terms ``kl`` (symmetric KL between
    the pair's distributions p = softmax(s)), ``eh`` (mean per-sample entropy of q = softmax(s / tau)) and
    ``he`` (entropy of the batch-mean q, over the global batch when distributed)."""
    pairs = list(sparse_pairs(len(logits)) if pairs is None else pairs)
    p = [F.softmax(s, dim=1) for s in logits]  # V x (N, C)
    q = p if tau == 1.0 else [F.softmax(s / tau, dim=1) for s in logits]
    counts = [0] * len(logits)  # how many pairs each view is in: EH and HE enter each pair's mean once
    for a, b in pairs:
        counts[a] += 1
        counts[b] += 1
    used = [v for v, c in enumerate(counts) if c > 0]
    kl = sum(0.5 * (_kl(p[a], p[b], eps) + _kl(p[b], p[a], eps)) for a, b in pairs) / len(pairs)
    ent = [-(q[v] * (q[v] + eps).log()).sum(dim=1).mean() for v in used]  # per-sample entropies, (,) each
    qs, _ = gather_with_grad(torch.stack([q[v] for v in used], dim=1))  # (N_global, V_used, C)
    m = qs.mean(dim=0)  # (V_used, C), the global batch's mean distribution of each view
    he_v = -(m * (m + eps).log()).sum(dim=1)  # (V_used,)
    w = [counts[v] / (2 * len(pairs)) for v in used]  # each pair weighs its two views 1/2
    eh = sum(wi * e for wi, e in zip(w, ent))
    he = sum(wi * h for wi, h in zip(w, he_v))
    loss = kl + (1 + lam1) * eh - lam2 * he
    return {"loss": loss, "kl": kl, "eh": eh, "he": he}


def _kl(p1: torch.Tensor, p2: torch.Tensor, eps: float) -> torch.Tensor:
    """KL(p1 || p2) per sample, averaged over the batch (official ``KL``): p1, p2 (N, C)."""
    return (p1 * ((p1 + eps).log() - (p2 + eps).log())).sum(dim=1).mean()


# --- model ----------------------------------------------------------------------------------------


class TWIST(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        h = cfg.proj_hidden_dim
        self.projector = nn.Sequential(  # official ``ProjectionHead.projection_head`` (dropout 0 left out)
            nn.Linear(feature_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
        )
        self.last_linear = nn.Linear(h, cfg.num_classes)  # the C logits
        self.logit_norm = nn.BatchNorm1d(cfg.num_classes, affine=False) if cfg.logit_bn else nn.Identity()

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """(M, C) normalised logits of (M, D) backbone features."""
        return self.logit_norm(self.last_linear(self.projector(feats)))

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        views = batch["views"]  # 2 global (N, C, H, W), then M local (N, C, h, w)
        n = len(views[0])
        logits = self.head(multicrop_features(self.backbone, views)).split(n)  # V x (N, C); one BN over all
        out = twist_loss(logits, cfg.tau, cfg.lam1, cfg.lam2, cfg.eps)
        with torch.no_grad():
            used = logits[0].argmax(dim=1).unique().numel() / cfg.num_classes
        return {**out, "used_classes": torch.tensor(used)}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (the CLS token of a ViT), without the head: the official linear
        evaluation trains on the trunk's output."""
        return encode(self.backbone, x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class of each image, (N,) in [0, C): the argmax of its class distribution
        (official ``eval_one_epoch``)."""
        return self.head(encode(self.backbone, x)).argmax(dim=1)


MODEL = TWIST


if __name__ == "__main__":
    s = torch.randn(8, 5)
    print({k: round(float(v), 4) for k, v in twist_loss([s, s + 0.1 * torch.randn(8, 5)]).items()})
