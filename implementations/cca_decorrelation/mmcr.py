"""MMCR — Yerxa, Kuang, Simoncelli, Chung. "Learning Efficient Coding of Natural Images with Maximum
Manifold Capacity Representations". NeurIPS 2023, arXiv:2303.03307. Catalog id: ``mmcr``. Official code:
ThomasYerxa/mmcr.

Each of N images gives V augmented views; the network (backbone + projector) maps view k of image i to
z_ik, normalised to the unit sphere. The views of one image form its "manifold"; its centroid is

    c_i = (1/V) sum_k z_ik / ||z_ik||,        C = [c_1; ...; c_N]  (N, D),

and the loss maximises the nuclear norm (the sum of singular values) of the centroid matrix:

    L = -||C||_*  +  lambda (1/N) sum_i ||Z_i||_*,       Z_i = [z_i1, ..., z_iV]  (D, V).

The second, per-manifold term is optional and off by default (lambda = 0: the paper's and the official
``--lmbda`` default). As in the official loss, ||C||_* is not divided by N; only the per-manifold term is
a mean over the N images. With the momentum encoder (the official ImageNet default, ``MMCR_Momentum``), a
copy of backbone + projector, updated as an EMA with tau = 0.99 and given no gradient, embeds the same
views too, and C is the mean of the online and the momentum centroids, c_i = (c_i^online + c_i^mom) / 2.

Collapse: ||C||_* <= sqrt(N) ||C||_F <= N, as every centroid has norm at most 1. A collapsed embedding
(every view of every image on one unit vector) gives C of rank one, ||C||_* = sqrt(N), while N orthogonal
unit centroids (each image's views agree, different images are orthogonal, D >= N) reach the maximum N.
Maximising the nuclear norm therefore asks each manifold to shrink (a centroid has norm 1 only when all
its views coincide) and the centroids to spread over many orthogonal directions, a flat spectrum of C.

Distributed: ||C||_* is a statistic of the GLOBAL batch (an SVD does not split into per-rank sums). Each
rank all-gathers its normalised embeddings with gradient (``gather_with_grad``, whose backward returns to
each rank the summed gradient of its own rows) and computes the SVD of the whole (N_global, D) centroid
matrix, so every rank holds the same, global loss; after DDP's gradient averaging the gradient is that
of the concatenated batch (each rank's rows receive the gradient of every rank's copy of the loss,
world_size times the loss's own, and DDP divides by world_size). The official loss gathers with a plain
``all_gather`` and puts its own rows back with their graph: each rank's rows then get only their own
copy's gradient, and after DDP averaging the gradient is 1/world_size of the global batch's (our reading
of the official code; LARS's trust ratio hides that scale for the weights, not for the biases and BN
parameters). The momentum embeddings are gathered the same way, without gradient.
Cost: every rank computes the SVD of the (N_global, D) matrix, O(N_global D min(N_global, D)), as the
official code does.

Views: the official ImageNet loader draws V/2 pairs from Barlow Twins' two asymmetric distributions
(blur p=1.0 / no solarisation, and blur p=0.1 / solarisation p=0.2), so views 0, 2, ... use the first and
views 1, 3, ... the second; all views of the batch pass through the network as one batch, as the official
model sees them (one BN batch of N V rows).

Sources: only the paper's abstract and front matter were accessible here; the equations above and every
default are read from the official code (``mmcr/imagenet/loss_mmcr.py``, ``loss_mmcr_momentum.py``,
``models.py``, ``train.py``, ``pretrain_imagenet.py``), whose README also mentions 4- and 8-view ImageNet
runs (``--n_aug 4``; 8 views on 8 nodes). Section and table numbers of the paper are therefore not cited.

Deviations:
- the centroid matrix's SVD is computed in float32 with autocast off (the official code runs under AMP;
  ``torch.linalg.svdvals`` has no half-precision kernel, autocast runs it in float32 anyway);
- the official momentum loss drops centroids with inf/nan entries before the SVD; here a non-finite loss is
  left to the harness, which reports it;
- the EMA copies the online network's buffers (BN running statistics) into the momentum network
  (``ema_update`` as in byol.py), where the official callback updates only the parameters and the momentum
  network's BN tracks its own statistics; the running statistics are used in eval mode only, and the
  momentum network is only run in training;
- the learning rate: linear warm-up, then the harness's cosine decays it to 0; the official schedule
  (Composer's ``CosineAnnealingWithWarmupScheduler``, ``alpha_f=0.001``) to 1/1000 of the peak;
- the views: crops are resized with antialiased bilinear interpolation (the harness's batched crop) where
  the official loader uses bicubic; the Gaussian blur needs a kernel size in torchvision, 10% of the side,
  odd (23 px at 224), where the official loader blurs with PIL by radius sigma; it is dropped below 64 px,
  as SimCLR does for CIFAR-10 (its App. B.9).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    num_views: int = 2
    """V, augmented views per image: the official ImageNet ``--n_aug`` default (its README also runs 4 and
    8), and 40 for CIFAR/STL (official ``pretrain_cifar_stl.py --n_aug``); not verified in the paper's text."""
    lmbda: float = 0.0
    """lambda, the weight of the mean per-manifold nuclear norm: 0 by default (official ``--lmbda`` default
    for ImageNet and CIFAR/STL)."""
    momentum_encoder: bool = True
    """An EMA copy of backbone + projector whose centroids are averaged with the online ones: the official
    ImageNet default ``--objective MMCR_Momentum``; False is the plain ``MMCR`` objective (the official
    CIFAR/STL code has no momentum encoder)."""
    tau: float = 0.99
    """EMA rate of the momentum encoder, constant, updated after every step (official ``--tau`` default and
    its ``MomentumUpdate`` callback; no schedule)."""
    proj_hidden_dim: int = 8192
    """Width of the projector's hidden layers: 8192-8192-512 on the ResNet-50's 2048 features (official
    ``projector_dims`` for ImageNet, "following exactly barlow twins", with BN + ReLU and no biases)."""
    proj_dim: int = 512
    """D, the dimension of the embeddings fed to the loss (official ImageNet ``projector_dims``; 128 for
    CIFAR/STL)."""
    proj_layers: int = 3
    """Linear layers in the projector (official ImageNet ``projector_dims = [8192, 8192, 512]``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop: the official loader's ``RandomResizedCrop``
    default scale (Barlow Twins' recipe)."""
    optimizer: str = "lars"
    """LARS, biases and BN parameters excluded from weight decay and adaptation (official ``train.py``:
    ``weight_decay_filter=True, lars_adaptation_filter=True``), as the harness's default groups do."""
    base_lr: float = 0.6
    """Learning rate per 256 images: lr = 0.6 x batch/256 (official ``--lr`` default and ``train.py``)."""
    weight_decay: float = 1e-6
    """Official ``train.py`` (LARS ``weight_decay``)."""
    momentum: float = 0.9
    """LARS momentum (official ``train.py``)."""
    warmup_epochs: int = 10
    """Linear warm-up, then cosine decay (official ``CosineAnnealingWithWarmupScheduler(t_warmup="10ep")``)."""
    epochs: int = 100
    """Official ``--epochs`` default for ImageNet."""
    batch_size: int = 2048
    """Images per step, over all GPUs (official ``--batch_size`` default; each image brings V views)."""
    sync_batchnorm: bool = True
    """The official code converts every BN to SyncBatchNorm: the projector's BN statistics are global."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# k-NN figures are from `selfsup train mmcr --set ...` runs, random init 0.839):
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets);
# - projector 1024-1024-256 on the small CNN's 256-d features: about half the official width ratio (8192 on
#   2048), and D = 4 N at batch 64 so that N orthogonal centroids fit;
# - num_views 4: several views per manifold, as the official multi-view runs (4 on ImageNet, 40 on CIFAR):
#   k-NN 0.911 (run 1, 1755 s on the shared CPU) where 2 views give 0.897 (run 2, 739 s) and 0.906
#   with base_lr 4.0 (run 3, 584 s): 4 views are kept for the best figure, 2 views at 4.0 are the cheap option;
# - base_lr 2.0 (lr 0.5 at batch 64), warmup_epochs 1: LARS's trust ratio (eta 0.001) with the official
#   0.6 would move the weights by ~1.5e-4 of their norm a step, and its 10 warm-up epochs are 2/3 of the
#   15 here (as in barlow_twins.py's preset; the official 0.6 was not tried);
# - the momentum encoder stays on with the official tau 0.99 (330 steps: the EMA horizon is 100 steps);
#   lmbda the official 0.
PRESETS = {"small": dict(min_scale=0.4, proj_hidden_dim=1024, proj_dim=256, num_views=4, base_lr=2.0,
                         warmup_epochs=1)}


# --- augmentations (official ImageNet loader: Barlow Twins' two distributions) --------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """V views, alternating Barlow Twins' two distributions (official ``Barlow_Transform``): crop, flip,
    colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale (p=0.2), then blur with p=1.0 and no
    solarisation for views 0, 2, ..., blur with p=0.1 and solarisation with p=0.2 for views 1, 3, ....
    Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""
    if cfg.num_views < 2:
        raise ValueError(f"MMCR needs at least 2 views per image (num_views={cfg.num_views})")

    def make(blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:  # a 23-px kernel at 224 px is about 10% of the side
            kernel = int(0.1 * image_size) // 2 * 2 + 1
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        steps += [v2.RandomSolarize(threshold=128, p=solarize_p)]  # on uint8 values, as PIL's solarize
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    return [make(1.0, 0.0) if k % 2 == 0 else make(0.1, 0.2) for k in range(cfg.num_views)]


# --- heads ----------------------------------------------------------------------------------------


def projector(in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Module:
    """``layers`` linear layers without bias, BN + ReLU after each but the last (official ``Model.g``,
    ``bias_proj=False, bias_last=False``)."""
    sizes = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    blocks: list[nn.Module] = []
    for i in range(layers - 1):
        blocks += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
    blocks.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*blocks)


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


def mmcr_terms(z: torch.Tensor, z_mom: torch.Tensor | None = None, local: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(||C||_*, mean_i ||Z_i||_*) over the GLOBAL batch. z: (N, V, D) this rank's embeddings, view k of
    image i at [i, k]; z_mom: the same from the momentum encoder (no gradient) or None. Embeddings are
    L2-normalised here; under torch.distributed both are gathered, with gradient, from every rank. The
    per-manifold term is computed only when ``local`` (it is 0 otherwise)."""
    z = F.normalize(z, dim=-1)
    z_all, _ = gather_with_grad(z)  # (N_global, V, D)
    centroids = z_all.mean(dim=1)  # (N_global, D)
    if z_mom is not None:
        z_mom_all, _ = gather_with_grad(F.normalize(z_mom, dim=-1))
        centroids = 0.5 * (centroids + z_mom_all.mean(dim=1))  # official MMCR_Momentum_Loss
    global_nuc = torch.linalg.svdvals(centroids).sum()
    if local:
        local_nuc = torch.linalg.svdvals(z_all).sum(dim=-1).mean()  # batched over the N_global (V, D) matrices
    else:
        local_nuc = torch.zeros((), device=z.device, dtype=z.dtype)
    return global_nuc, local_nuc


def mmcr_loss(z: torch.Tensor, lmbda: float = 0.0, z_mom: torch.Tensor | None = None) -> torch.Tensor:
    """L = -||C||_* + lambda mean_i ||Z_i||_* of the embeddings z (N, V, D), over the global batch."""
    global_nuc, local_nuc = mmcr_terms(z, z_mom, local=lmbda != 0)
    return lmbda * local_nuc - global_nuc


# --- model ----------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


class MMCR(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.online = nn.Sequential(backbone, projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers))
        # the momentum network starts as a copy of the online one (official MomentumModel) and gets no gradient
        self.momentum = copy.deepcopy(self.online).requires_grad_(False) if cfg.momentum_encoder else None

    @property
    def backbone(self) -> nn.Module:
        return self.online[0]

    def forward(self, batch: dict) -> dict:
        views = batch["views"]  # V tensors (N, C, H, W)
        n, v = views[0].shape[0], len(views)
        x = torch.stack(views, dim=1).flatten(0, 1)  # (N V, C, H, W), the views of an image adjacent
        z = self.online(x).view(n, v, -1)  # (N, V, D); one BN batch of N V rows, as officially
        z_mom = None
        if self.momentum is not None:
            with torch.no_grad():
                z_mom = self.momentum(x).view(n, v, -1)
        with torch.autocast(x.device.type, enabled=False):  # the SVDs in float32, also under AMP
            global_nuc, local_nuc = mmcr_terms(
                z.float(), None if z_mom is None else z_mom.float(), local=self.cfg.lmbda != 0)
            loss = self.cfg.lmbda * local_nuc - global_nuc
        with torch.no_grad():
            zn = F.normalize(z, dim=-1)
            centroid_norm = zn.mean(dim=1).norm(dim=-1).mean()  # 1 when the views of an image coincide
        return {"loss": loss, "nuclear_norm": global_nuc.detach(), "centroid_norm": centroid_norm}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA update of the momentum network after the optimizer step, constant tau (official callback)."""
        if self.momentum is not None:
            ema_update(self.momentum, self.online, self.cfg.tau)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The online backbone's features f(x) (the projector is discarded; the official linear evaluation
        reads the ResNet-50's 2048-d features)."""
        return self.backbone(x)


MODEL = MMCR


if __name__ == "__main__":
    n, v, d = 8, 4, 16
    base = torch.randn(n, 1, d)
    print("aligned views:", mmcr_loss(base.expand(n, v, d)).item(), "(minimum -N =", -n, "when orthogonal)")
    print("noisy views:", mmcr_loss(base + 2 * torch.randn(n, v, d)).item())
    print("collapsed:", mmcr_loss(torch.ones(n, v, d)).item(), "= -sqrt(N)")
