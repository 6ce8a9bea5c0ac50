"""SwAV — Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments". NeurIPS 2020, arXiv:2006.09882. Catalog id: ``swav``.
Official code: https://github.com/facebookresearch/swav (``main_swav.py``, ``distributed_sinkhorn``).

Online clustering with swapped prediction. Each view x_v of an image is embedded into a unit vector
z_v = g(f(x_v)) / ||g(f(x_v))|| and scored against K learnable prototypes c_1..c_K (unit rows of C).
The code q_v of a view is its soft assignment to the prototypes, computed without gradient from the
scores of the whole batch under an equipartition constraint (Sec. 3.1, Eq. 3): among the
transportation polytope

    Q = { Q in R_+^{K x B} : Q 1_B = 1/K 1_K,  Q^T 1_K = 1/B 1_B },

maximise Tr(Q^T C^T Z) + eps H(Q), whose solution is Q* = Diag(u) exp(C^T Z / eps) Diag(v), with u and
v found by a few Sinkhorn-Knopp iterations (3, eps 0.05); the columns of B Q* are the codes. A view
then predicts the code of another view of the same image (Eq. 1-2):

    L = sum_{i in assigned} sum_{v != i} l(z_v, q_i),   l(z, q) = - sum_k q^(k) log p^(k),
    p^(k) = exp(z^T c_k / tau) / sum_k' exp(z^T c_k' / tau),   tau = 0.1,

averaged over the batch, over the V - 1 predicting views and over the assigned views, as the official
code does. Codes come from the two global crops only ("crops_for_assign 0 1"); every crop, the six
low-resolution ones of multi-crop included (Sec. 3.2: 2 x 224 + 6 x 96), predicts them. The prototypes
are projected back onto the sphere before every step (official code) and are not updated in the first
epoch ("freeze_prototypes_niters 313": one epoch at batch 4096). With small batches a queue of the
embeddings of recent batches joins the Sinkhorn problem (Sec. 3.1, "Working with small batches";
official "queue_length 3840" at batch 256, from epoch 15): its columns shape the codes and are then
dropped; they carry no gradient.

Collapse: with no constraint, every view could be sent to one prototype and predict it perfectly. The
equipartition constraint makes each batch's codes spread evenly over the prototypes, so a constant
embedding gets uniform codes and pays log K (the logged ``code_entropy`` and ``used_prototypes`` show
how spread the codes are). The codes take no gradient (a stop-gradient on the targets).

Distributed: the Sinkhorn problem is over the global batch. Each rank exponentiates its own columns;
the total, the prototype (row) sums and the number of columns are all-reduced, and the column
normalisation is per column, so each rank gets exactly its columns of the global solution (official
``distributed_sinkhorn``). The queue is kept identical on every rank (the embeddings of the global batch
are all-gathered into it) and each rank puts its share (rows r, r + W, ...) into the problem, so that
every queued embedding is a column once. The loss is per sample, so DDP's gradient averaging gives the
global batch's. BN statistics are global with SyncBatchNorm (official ``--sync_bn``).

Deviations:
- the official queue is split over the GPUs (each keeps queue_length / W of its own embeddings); here
  every rank holds the whole queue and uses a 1/W share of it: the same Sinkhorn problem, and a state
  that is the same on every rank, so that a checkpoint of rank 0 resumes any of them;
- the queue is a ring buffer (the official code shifts it); the columns of the Sinkhorn problem are
  unordered, so the codes are the same;
- the Sinkhorn iterations subtract the global maximum score before exponentiating (the first
  normalisation divides it out again): scores z^T c lie in [-1, 1], but not in an unnormalised test;
- durations in epochs (the frozen prototypes, the queue's start) are fractions of ``epochs`` applied to
  the run's total steps; the prototypes are frozen by zeroing their gradient (a hook), not by dropping
  it before the step: with LARS a zero gradient leaves weight decay alone, whose trust-scaled update only
  shrinks the rows, which the renormalisation undoes, so the prototypes' directions stay fixed;
- the harness's schedule: a linear warm-up from 0 (official: from ``start_warmup`` 0.3) and a cosine to 0
  (official: to ``final_lr`` 0.0048); biases and BN parameters get no weight decay and no LARS
  adaptation (official: LARC on every parameter, ``clip=False``);
- crops are resized bilinearly so that they run batched on the device, the flip comes after the crop
  as in the official pipeline, and the blur (official: PIL, radius 0.1-2) is a Gaussian kernel of 10% of
  the crop's side, dropped below 64 px (as SimCLR does for CIFAR-10).
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
    num_prototypes: int = 3000
    """K (official ``--nmb_prototypes 3000`` in every ImageNet script)."""
    proj_hidden_dim: int = 2048
    """Hidden width of the 2-layer projection head, Linear-BN-ReLU-Linear (official ``--hidden_mlp``)."""
    proj_dim: int = 128
    """The embedding z, L2-normalised (official ``--feat_dim 128``)."""
    temperature: float = 0.1
    """tau of the prediction's softmax, Eq. 2 (official ``--temperature 0.1``)."""
    epsilon: float = 0.05
    """eps, the entropy regularisation of Eq. 3 (official ``--epsilon 0.05``)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp iterations (Sec. 3.1: "3 iterations"; official ``--sinkhorn_iterations``)."""
    crops_for_assign: tuple[int, ...] = (0, 1)
    """The views whose codes are predicted: the two global crops (official ``--crops_for_assign 0 1``)."""
    n_local_crops: int = 6
    """Low-resolution crops of multi-crop (Sec. 3.2, "2x224 + 6x96"; official ``--nmb_crops 2 6``)."""
    global_crop_scale: tuple[float, float] = (0.14, 1.0)
    """Area range of the global crops (official ``--min_scale_crops 0.14``, ``--max_scale_crops 1.``)."""
    local_crop_scale: tuple[float, float] = (0.05, 0.14)
    """Area range of the local crops (official ``--min_scale_crops 0.05``, ``--max_scale_crops 0.14``)."""
    local_crop_ratio: float = 96 / 224
    """Side of a local crop over a global one: 96 px vs. 224 px (Sec. 3.2)."""
    queue_length: int = 0
    """Queued embeddings per assigned view; 0 for none, the 800-epoch batch-4096 setting (official
    swav_800ep_pretrain.sh); the batch-256 scripts use 3840."""
    epoch_queue_starts: float = 15
    """The epoch from which the queue is filled and, once full, used (official ``--epoch_queue_starts``)."""
    freeze_prototypes_epochs: float = 1
    """Epochs during which the prototypes get no update (official ``--freeze_prototypes_niters 313`` at
    batch 4096, i.e. one ImageNet epoch; 5005 at batch 256)."""
    optimizer: str = "lars"
    """SGD with LARC, trust coefficient 0.001 (official ``main_swav.py``)."""
    base_lr: float = 0.3
    """4.8 at batch 4096, i.e. 0.3 per 256 images, then cosine (official swav_800ep_pretrain.sh)."""
    weight_decay: float = 1e-6
    """Official ``--wd 0.000001``."""
    momentum: float = 0.9
    """SGD momentum (official ``main_swav.py``)."""
    warmup_epochs: int = 10
    """Linear warm-up (official ``--warmup_epochs 10``)."""
    epochs: int = 800
    """The paper's headline run (Table 1: 75.3% linear top-1 with ResNet-50)."""
    batch_size: int = 4096
    """64 images on each of 64 GPUs (official swav_800ep_pretrain.sh)."""
    sync_batchnorm: bool = True
    """Official ``--sync_bn``."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - epochs 15: the harness's budget, so that the epoch-based durations count in its epochs;
# - num_prototypes 100: ten per class, more than the 64 dimensions of z (with fewer prototypes than
#   dimensions an embedding orthogonal to the prototypes' differences scores them all alike);
# - queue_length 384 (6 batches) from epoch 2: the paper's remedy for small batches (3840 = 15 batches
#   of 256), started early because 15 epochs are the whole run; with the batch, 448 columns for 100
#   prototypes;
# - proj_hidden_dim 512, proj_dim 64, n_local_crops 4: heads and crops sized to the small CNN's 256-d
#   features; each 16-px local crop costs a quarter of a global one;
# - optimizer and rate of the batch-256 script (LARS, base_lr 0.6 per 256) without warm-up (its
#   ``--warmup_epochs 0``);
# - global_crop_scale (0.3, 1), local_crop_scale (0.14, 0.3): 5% of an 8x8 digit upscaled to 32 px is a
#   blob.
# NOT LEARNING YET on digits: the codes drift to uniform and the loss to log K (a constant embedding,
# prototypes orthogonal to it, uniform predictions), which equipartition does not rule out. At random
# init the small CNN embeds every digit in nearly the same direction (per-dimension std of z about 0.02),
# so the first codes are soft and the network settles before z spreads. Runs: K = 30, uniform codes by
# step 100, k-NN 73.3% (random init 83.9%); K = 100 (this preset), uniform codes by epoch 4, stopped. On a
# fixed set of 4 batches, with the queue off, every one of these drifted to uniform within 60 steps: this
# preset, SGD at base_lr 0.2, no local crops, epsilon 0.02, LARS at base_lr 2.4 (with epsilon 0.03 too),
# AdamW at 4e-3, prototypes frozen throughout, 16-d z with 32 prototypes, temperature 0.2. At random init
# the two views of a digit are no closer than two different digits (mean cosine of z 0.33 against 0.34,
# and their codes' argmax agree for 0 of 64 images), even with global crops of 90-100% of the image;
# without the colour jitter the views' cosine only rises to 0.43 (0.31 between digits) and 3 of 64 codes
# agree. The first swapped targets are noise, and predicting uniform is the nearest optimum.
PRESETS = {
    "small": dict(epochs=15, num_prototypes=100, queue_length=384, epoch_queue_starts=2, proj_hidden_dim=512,
                  proj_dim=64, n_local_crops=4, base_lr=0.6, warmup_epochs=0, global_crop_scale=(0.3, 1.0),
                  local_crop_scale=(0.14, 0.3)),
}


# --- augmentations (official multicropdataset.py) -------------------------------------------------


def local_crop_size(cfg: Config, image_size: int) -> int:
    """The local crops' side: the 96/224 ratio rounded to a multiple of 8 (96 is one: six ViT-S/16 patches);
    16 px at 32 px, i.e. four 4-px patches, 2x2 after three poolings."""
    return max(8, 8 * round(image_size * cfg.local_crop_ratio / 8))


def multicrop_view(size: int, scale: tuple[float, float], image_size: int, mean, std) -> v2.Compose:
    """One crop of multi-crop at side ``size``: random resized crop of area ``scale``, flip, colour jitter
    (0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2, blur p=0.5 for images of 64 px or more (official
    ``get_color_distortion`` with s = 1 and ``PILRandomGaussianBlur``). It takes a PIL image or a uint8
    tensor."""
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if image_size >= 64:  # sigma 0.1-2 px, kernel 10% of the crop's side
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225)) -> list[v2.Compose]:
    """2 global crops, then M local crops, each its own v2 pipeline (official multicropdataset.py)."""
    local = local_crop_size(cfg, image_size)
    return [multicrop_view(image_size, cfg.global_crop_scale, image_size, mean, std) for _ in range(2)] + [
        multicrop_view(local, cfg.local_crop_scale, image_size, mean, std) for _ in range(cfg.n_local_crops)]


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


# --- Sinkhorn-Knopp and the swapped prediction ----------------------------------------------------


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x summed (or maximised, ``op="max"``) over the ranks, in place; x when not distributed."""
    if _world()[0] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes (B_local, K) for this rank's columns of the global problem of Eq. 3. scores: (B_local, K),
    z^T C of this rank's samples (queue share and batch). Sinkhorn-Knopp on Q = exp(C^T Z / eps), K x B:
    rows scaled to sum 1/K, then columns to 1/B, ``iterations`` times; the columns of B Q sum to 1.
    Row sums, the total and B are sums over every rank (official ``distributed_sinkhorn``)."""
    s = scores.float()
    top = _all_reduce(s.max().clone(), "max")
    q = torch.exp((s - top) / epsilon).T  # (K, B_local)
    k = q.shape[0]
    b = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))  # B, the global number of columns
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype's total weight ...
        q /= k  # ... is 1/K
        q /= q.sum(dim=0, keepdim=True)  # each sample's total weight ...
        q /= b  # ... is 1/B
    return (q * b).T  # (B_local, K), rows sum to 1


def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], assigned: Sequence[int],
              temperature: float) -> torch.Tensor:
    """Eq. 1-2 with multi-crop: scores V x (N, K), z_v^T C of every view; codes A x (N, K), the codes of
    views ``assigned`` (A indices into the views; no gradient). For each assigned view i, the mean over
    the other V - 1 views v of the cross-entropy - sum_k q_i^(k) log softmax(z_v^T C / tau)^(k), averaged
    over the batch; then the mean over the A assigned views."""
    total = 0.0
    for i, q in zip(assigned, codes):
        q = q.detach()
        sub = 0.0
        for v, s in enumerate(scores):
            if v != i:
                sub = sub - (q * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()
        total = total + sub / (len(scores) - 1)
    return total / len(codes)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Dequeue and enqueue (MoCo v1 Sec. 3.2), in place: keys (N_global, D) overwrite the oldest entries of
    queue (K, D), from ptr (a 0-d long tensor) on, wrapping around its end; ptr moves past them."""
    size = queue.shape[0]
    keys = keys[-size:]  # more keys than slots: the newest K
    slots = (ptr + torch.arange(len(keys), device=queue.device)) % size  # (N_global,)
    queue[slots] = keys.to(queue.dtype)
    ptr.copy_((ptr + len(keys)) % size)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# --- model ----------------------------------------------------------------------------------------


class SwAV(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if not cfg.crops_for_assign or not all(0 <= i < 2 + cfg.n_local_crops for i in cfg.crops_for_assign):
            raise ValueError(f"crops_for_assign {cfg.crops_for_assign}: indices of the {2 + cfg.n_local_crops} views")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = nn.Sequential(  # official ``projection_head``
            nn.Linear(feature_dim, cfg.proj_hidden_dim), nn.BatchNorm1d(cfg.proj_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden_dim, cfg.proj_dim),
        )
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.num_prototypes, bias=False)  # rows c_k
        self.normalize_prototypes()
        a = len(cfg.crops_for_assign)
        self.register_buffer("queue", torch.zeros(cfg.queue_length, a, cfg.proj_dim))  # (L, A, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # entries written, up to L
        self.register_buffer("queue_on", torch.tensor(cfg.queue_length > 0 and cfg.epoch_queue_starts <= 0))
        self.register_buffer("prototypes_frozen", torch.tensor(cfg.freeze_prototypes_epochs > 0))
        self.prototypes.weight.register_hook(lambda g: g.masked_fill(self.prototypes_frozen, 0))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """c_k <- c_k / ||c_k|| (official: before every step)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def _queue_share(self, j: int) -> torch.Tensor:
        """This rank's rows of the queue of assigned view j, (L / W, D): every queued embedding is in one
        rank's problem."""
        world, rank = _world()
        return self.queue[rank::world, j]

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        views = batch["views"]  # 2 global (N, C, H, W), then M local (N, C, h, w)
        n = len(views[0])
        self.normalize_prototypes()
        z = F.normalize(self.projector(multicrop_features(self.backbone, views)), dim=1)  # (V N, D)
        scores = self.prototypes(z).split(n)  # V x (N, K)
        z = z.detach().split(n)
        use_queue = bool(self.queue_on) and int(self.queue_filled) >= cfg.queue_length
        codes = []
        with torch.no_grad():
            for j, i in enumerate(cfg.crops_for_assign):
                s = scores[i].float()
                if use_queue:
                    s = torch.cat([self._queue_share(j) @ self.prototypes.weight.T.float(), s])  # (L/W + N, K)
                codes.append(sinkhorn(s, cfg.epsilon, cfg.sinkhorn_iterations)[-n:])  # (N, K), this batch's
            if bool(self.queue_on):  # after the codes: the batch's own columns are already in the problem
                keys = concat_all_gather(torch.stack([z[i].float() for i in cfg.crops_for_assign], dim=1))  # (N_global, A, D)
                enqueue(self.queue, self.queue_ptr, keys)
                self.queue_filled.copy_(torch.clamp(self.queue_filled + len(keys), max=cfg.queue_length))
        loss = swav_loss(scores, codes, cfg.crops_for_assign, cfg.temperature)
        with torch.no_grad():
            q = codes[0]
            entropy = -(q * q.clamp_min(1e-12).log()).sum(dim=1).mean()
            used = q.argmax(dim=1).unique().numel() / cfg.num_prototypes
        return {"loss": loss, "code_entropy": entropy, "used_prototypes": torch.tensor(used),
                "queue_used": torch.tensor(float(use_queue))}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the prototypes' freeze and the queue's start, by the fraction of the
        run they cover. ``step`` counts finished steps."""
        cfg = self.cfg
        self.prototypes_frozen.fill_(step < cfg.freeze_prototypes_epochs / cfg.epochs * total_steps)
        if cfg.queue_length > 0 and step >= cfg.epoch_queue_starts / cfg.epochs * total_steps:
            self.queue_on.fill_(True)
        self.normalize_prototypes()

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (the CLS token of a ViT), without projector: the official linear
        evaluation trains on the trunk's output."""
        return encode(self.backbone, x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest prototype of each image, (N,) in [0, K): the method's own clustering of x."""
        z = F.normalize(self.projector(encode(self.backbone, x)), dim=1)
        return self.prototypes(z).argmax(dim=1)


MODEL = SwAV


if __name__ == "__main__":
    codes = sinkhorn(torch.randn(12, 4), 0.05, 3)
    print("codes per sample sum to", codes.sum(1)[:3].tolist(), "prototype totals", codes.sum(0).tolist())
