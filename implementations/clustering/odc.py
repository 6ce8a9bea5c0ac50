"""ODC — Zhan, Xie, Liu, Ong, Loy. "Online Deep Clustering for Unsupervised Representation Learning".
CVPR 2020, arXiv:2006.10645. Catalog id: ``odc``.
Official code: https://github.com/open-mmlab/OpenSelfSup (``openselfsup/models/odc.py``,
``models/memories/odc_memory.py``, ``hooks/odc_hook.py``, ``configs/selfsup/odc/r50_v1.py``); later
MMSelfSup.

DeepCluster (Caron et al. 2018) alternates a global k-means over the data set with an epoch of training
towards its labels, and the labels (and the classifier that predicts them) change abruptly at every
clustering. ODC clusters online (Sec. 3): two memories, updated at every iteration, replace the
periodic clustering.

- Samples memory: for every training image i an l2-normalised feature f_i and a label y_i. A batch's
  features z_i (the projection head's output) enter it with momentum m (Sec. 3.2, "memory update")

      f_i <- normalise((1 - m) f_i + m z_i / ||z_i||),

  and each of the batch's samples is then re-assigned to its nearest centroid (Sec. 3.2, "label
  re-assignment")

      y_i <- argmin_k || f_i - C_k ||^2.

- Centroids memory: C_k = the mean of the memory features of cluster k, recomputed from the samples
  memory every ``centroids_update_interval`` iterations (Sec. 3.2, "centroids memory update").

The network (backbone, projection head, classification head g over K clusters) minimises the
cross-entropy of its prediction against the memory label, weighted by cluster size (Sec. 3.3, "loss
re-weighting"):

    L = sum_i w_{y_i} l(g(z_i), y_i) / sum_i w_{y_i},    w_k proportional to |k|^(-1/2),

with the label y_i read before the batch's memory update. Everything starts from one k-means of the
whole training set's (l2-normalised) projections before the first iteration (the only global
clustering); memory features are those projections, centroids their cluster means.

Collapse: a few giant clusters would make the labels uninformative and predicting them trivial
(Sec. 3.3). Two mechanisms keep the clusters balanced. Loss re-weighting: a sample of a large cluster
weighs less (power 1/2 of the inverse size), so the gradient does not favour growing clusters. Dealing
with small clusters: after every iteration each cluster with fewer than ``min_cluster_size`` members is
dissolved (its samples go to their nearest remaining centroid), and each dissolved (empty) cluster is
refilled by splitting the currently largest cluster in two with a 2-means on its memory features; the
centroids of both are recomputed. The memories take no gradient: the labels are targets.

Distributed: every rank holds the whole memory (registered buffers, so checkpoints hold it) and keeps it
identical: the batch's indices and projections are all-gathered (``concat_all_gather``) before the
memory update, so every rank writes the global batch in the same order; the initial clustering, the
recomputed centroids and the labels after a small-cluster fix are broadcast from rank 0 (CUDA's
``index_add_`` is not bitwise reproducible). The loss is normalised by the weight sum of the global
batch (from the gathered indices), so DDP's gradient averaging gives the one-process gradient of the
weighted mean over the global batch. The rotation angles are drawn for the global batch and each rank
takes its rows.

Deviations:
- any backbone of the harness stands for ResNet-50; the projection head (official ``NonLinearNeckV0``,
  fc-BN-ReLU-dropout-fc-ReLU, 2048-512-256) acts on its pooled output, the evaluation features are
  the backbone's (as the official linear evaluation of the backbone);
- re-assignment uses the squared l2 distance to the centroids (the paper's nearest centroid); the
  official code takes the largest inner product C_k^T f_i, which differs by ||C_k||^2 as the centroids
  (means of unit vectors) are not unit-norm. The same for dissolving small clusters;
- k-means is a short torch implementation run on the training device (random data points as initial
  centroids, 20 Lloyd iterations, empty clusters split), not faiss; the split of the largest cluster
  uses it with k = 2 (official: scikit-learn's ``KMeans(2, max_iter=20)``, k-means++ initialisation),
  falling back to a random halving when one side is empty (as the official code);
- the harness's cosine learning-rate schedule (official: step at epoch 400, x0.4); the data loader
  samples without replacement (official ``sampling_replace=True``);
- the random rotation (official ``RandomRotation(2)`` after the flip) has no batched counterpart in the
  harness, so it runs in ``forward`` on the normalised view, after the colour jitter and grayscale
  (per-pixel operations, which commute with it except at the filled corners), bilinear, filled with
  black as the PIL original; the random resized crop is bilinear so that it runs batched on the device.
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
    num_clusters: int = 10000
    """K, clusters in the memory and outputs of the classification head (official ``num_classes = 10000``,
    configs/selfsup/odc/r50_v1.py; Sec. 4)."""
    neck_hidden_dim: int = 512
    """Hidden width of the projection head (official ``NonLinearNeckV0(hid_channels=512)``)."""
    neck_dim: int = 256
    """Output width of the projection head, the memory features' dimension (official ``out_channels=256``,
    ``ODCMemory(feat_dim=256)``)."""
    neck_dropout: float = 0.5
    """Dropout in the projection head (official ``NonLinearNeckV0``: ``nn.Dropout()``, p = 0.5)."""
    memory_momentum: float = 0.5
    """m, the weight of the new feature in the samples memory (official ``ODCMemory(momentum=0.5)``)."""
    min_cluster_size: int = 20
    """Clusters smaller than this are dissolved and refilled by a split (official ``min_cluster=20``)."""
    centroids_update_interval: int = 10
    """Iterations between two recomputations of the centroids (official ``ODCHook(centroids_update_interval=10)``)."""
    small_clusters_interval: int = 1
    """Iterations between two small-cluster fixes (official ``deal_with_small_clusters_interval=1``)."""
    reweight_power: float = 0.5
    """w_k proportional to (1 / |k|)^power; 0 gives the plain cross-entropy (official ``reweight_pow=0.5``)."""
    kmeans_iterations: int = 20
    """Lloyd iterations of the initial k-means and of each split (official faiss ``niter = 20``; sklearn
    ``max_iter=20``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official ``RandomResizedCrop(224)``: torchvision's default)."""
    rotation_degrees: float = 2.0
    """Random rotation in [-d, d] degrees (official ``RandomRotation(degrees=2)``), applied in ``forward``."""
    optimizer: str = "sgd"
    """SGD (official config ``optimizer = dict(type='SGD', ...)``)."""
    base_lr: float = 0.03
    """Official ``lr=0.06`` at 64 x 8 = 512 images, i.e. 0.03 per 256."""
    weight_decay: float = 1e-5
    """Official ``weight_decay=0.00001``, on all parameters."""
    momentum: float = 0.9
    """Official ``momentum=0.9`` (the classification head's group has none: ``paramwise_options``)."""
    warmup_epochs: int = 0
    """No warm-up (official ``lr_config``)."""
    epochs: int = 440
    """Official ``total_epochs = 440``."""
    batch_size: int = 512
    """Official ``imgs_per_gpu=64`` on 8 GPUs."""
    sync_batchnorm: bool = True
    """Official ``norm_cfg=dict(type='SyncBN')``."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn): each
# image enters the memory only 15 times (once an epoch), against 440 on ImageNet, so the labels must be stable
# from the start:
# - num_clusters 20 (two per class; 10,000 are ten per ImageNet class) and min_cluster_size 10 (about the same
#   fraction of the mean cluster size as 20 of ImageNet's 128): with 50 clusters (min 5, base_lr 0.4,
#   min_scale 0.3) 60% of each batch changed label every step and k-NN ended at 0.825 against 0.839 for
#   random init; with 100 (min 3, base_lr 0.1, centroids every step) at 0.711;
# - centroids_update_interval 2: an epoch is 22 steps, not ImageNet's 2,500;
# - base_lr 0.4 (0.1 at batch 64), as in the three runs above (the official 0.03 per 256 was not tried);
# - min_scale 0.5: 8% crops of an 8x8 digit upscaled to 32 px are a blob.
PRESETS = {"small": dict(num_clusters=20, min_cluster_size=10, centroids_update_interval=2, min_scale=0.5,
                         base_lr=0.4, epochs=15)}


# --- augmentations (official ``train_pipeline``, configs/selfsup/odc/r50_v1.py) ----------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: random resized crop, horizontal flip, colour jitter (0.4, 0.4, 1.0, 0.5; always on),
    grayscale with p = 0.2, normalised. The official rotation by up to 2 degrees after the flip runs in
    ``forward`` (``random_rotation``). It takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=1.0, hue=0.5),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _broadcast(x: torch.Tensor) -> torch.Tensor:
    """x of rank 0 on every rank, in place; x when not distributed."""
    if _world()[0] > 1:
        dist.broadcast(x, src=0)
    return x


def random_rotation(x: torch.Tensor, degrees: float, fill: torch.Tensor) -> torch.Tensor:
    """Each image of x (N, C, H, W) rotated by an angle drawn uniformly in [-degrees, degrees]. The angles
    are drawn for the global batch (world x N) from the global RNG and this rank takes its rows, so that
    ranks seeded alike draw what one process on the whole batch draws."""
    if degrees <= 0:
        return x
    world, rank = _world()
    n = len(x)
    angles = (torch.rand(world * n) * 2 - 1)[rank * n : (rank + 1) * n] * math.radians(degrees)  # (N,)
    return rotate(x, angles, fill)


def rotate(x: torch.Tensor, angles: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) rotated about the image centre, counter-clockwise by angles (N,) in radians (as
    torchvision's ``rotate``), bilinear, the uncovered corners set to fill (C,)."""
    n = len(x)
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, *x.shape[1:]], align_corners=False)  # (N, H, W, 2)
    fill = fill.to(x.device, x.dtype)[None, :, None, None]  # (1, C, 1, 1)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


# --- k-means (copied from deepcluster.py) --------------------------------------------------------


@torch.no_grad()
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N,) index of the nearest centroid (k, D) of each row of x (N, D) in squared l2 distance, in chunks
    of rows so that the (chunk, k) score matrix stays bounded."""
    c_sq = (centroids * centroids).sum(dim=1)  # (k,)
    out = [(2 * x[i : i + chunk] @ centroids.T - c_sq).argmax(dim=1) for i in range(0, len(x), chunk)]
    return torch.cat(out)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of x (N, D) into k clusters: (labels (N,), centroids (k, D)). Initial centroids are
    k distinct data points drawn with ``generator`` (faiss's initialisation). After each update, every
    empty cluster takes the centroid of a non-empty one picked with probability proportional to its size
    (faiss), and the two are pushed apart along a random direction by 1/1024 of the points' mean norm
    (Sec. 3.3: "a small random perturbation"), so that the next assignment divides that cluster."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means of {n} points into {k} clusters: k must be between 1 and the number of points")
    pick = torch.randperm(n, generator=generator)[:k].to(x.device)
    centroids = x[pick].clone()  # (k, D)
    scale = float(x.norm(dim=1).mean()) / 1024  # the split's perturbation: small beside the data's spread
    for _ in range(iterations):
        labels = nearest_centroid(x, centroids)
        counts = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (k, D)
        full = counts > 0
        centroids[full] = sums[full] / counts[full, None].to(x.dtype)
        sizes = counts.double().cpu()
        for j in (~full).nonzero().flatten().tolist():  # a loop over empty clusters, rarely more than a few
            m = int(torch.multinomial(sizes / sizes.sum(), 1, generator=generator))
            delta = F.normalize(torch.randn(x.shape[1], generator=generator, dtype=torch.float64), dim=0) * scale
            delta = delta.to(x.device, x.dtype)
            centroids[j] = centroids[m] + delta
            centroids[m] = centroids[m] - delta
            sizes[j] = sizes[m] / 2  # each takes half of it for the next pick (faiss)
            sizes[m] -= sizes[j]
    return nearest_centroid(x, centroids), centroids


# --- the two memories: update rules ----------------------------------------------------------------


@torch.no_grad()
def memory_update(old: torch.Tensor, z: torch.Tensor, momentum: float) -> torch.Tensor:
    """Sec. 3.2: the new memory features (B, D) of a batch, normalise((1 - m) f + m z / ||z||), from the
    memory's old rows old (B, D) and the batch's projections z (B, D)."""
    return F.normalize((1 - momentum) * old + momentum * F.normalize(z, dim=1), dim=1)


@torch.no_grad()
def cluster_means(features: torch.Tensor, labels: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(K, D) centroids: the mean of the memory features (N, D) of each label (N,); an empty cluster keeps
    its old centroid (K, D) (official ``_compute_centroids``)."""
    counts = torch.bincount(labels, minlength=len(old))  # (K,)
    sums = torch.zeros_like(old).index_add_(0, labels, features)  # (K, D)
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(old.dtype), old)


def cluster_weights(labels: torch.Tensor, k: int, power: float) -> torch.Tensor:
    """Sec. 3.3 loss re-weighting: w_c = (1 / (|c| + 1e-5))^power for each of the k clusters, normalised
    to sum 1 (official ``set_reweight``; the normalisation cancels in the weighted mean)."""
    inv = (1.0 / (torch.bincount(labels, minlength=k).double() + 1e-5)) ** power  # (k,)
    return (inv / inv.sum()).float()


@torch.no_grad()
def split_cluster(x: torch.Tensor, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: the members (n, D) of a cluster that go to the second half of its 2-means split, or a
    random half of them when the 2-means leaves one side empty (official ``_partition_max_cluster``)."""
    labels, _ = kmeans(x, 2, iterations, generator)
    second = labels == 1
    if bool(second.all()) or not bool(second.any()):
        second = torch.zeros_like(second)
        second[torch.randperm(len(x), generator=generator)[: len(x) // 2].to(x.device)] = True
    return second


@torch.no_grad()
def fix_small_clusters(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, min_size: int,
                       iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 3.3, "dealing with small clusters" (official ``deal_with_small_clusters``): (labels (N,),
    centroids (K, D)), new tensors. The members of every cluster smaller than min_size go to their nearest
    centroid among the other clusters; then each of those clusters, now empty, takes the second half of a
    2-means split of the currently largest cluster, and the centroids of both become their members' mean."""
    labels, centroids = labels.clone(), centroids.clone()
    k = len(centroids)
    small = torch.bincount(labels, minlength=k) < min_size  # (K,)
    if not bool(small.any()) or bool(small.all()):
        return labels, centroids
    keep = (~small).nonzero().flatten()  # (K',) clusters that stay
    moved = small[labels]  # (N,) members of small clusters
    if bool(moved.any()):
        labels[moved] = keep[nearest_centroid(features[moved], centroids[keep])]
    for e in small.nonzero().flatten().tolist():  # a loop over the few clusters to refill
        largest = int(torch.bincount(labels, minlength=k).argmax())
        members = (labels == largest).nonzero().flatten()  # (n,)
        if len(members) < 2:
            break
        second = members[split_cluster(features[members], iterations, generator)]
        labels[second] = e
        for c in (largest, e):
            centroids[c] = features[labels == c].mean(dim=0)
    return labels, centroids


# --- heads and loss --------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """Official ``NonLinearNeckV0``: fc-BN(no affine, momentum 0.001)-ReLU-dropout-fc-ReLU; linear layers
    Kaiming-normal (fan in) with zero bias (``init_linear='kaiming'``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim, momentum=0.001, affine=False),
                                 nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim),
                                 nn.ReLU(inplace=True))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # (N, D_z)


def odc_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
             total_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sec. 3.3: sum_i w_{y_i} CE(logits_i, y_i) / sum_i w_{y_i} for logits (B, K), labels (B,), weights (K,)
    (``nn.CrossEntropyLoss(weight=w)``). ``total_weight``: the denominator when the sum over the global batch
    is taken elsewhere (the global weight sum divided by the number of ranks, under DDP)."""
    w = weights[labels]  # (B,)
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")  # (B,)
    return (w * ce).sum() / (w.sum() if total_weight is None else total_weight)


# --- model ----------------------------------------------------------------------------------------


class ODC(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.neck = ProjectionHead(feature_dim, cfg.neck_hidden_dim, cfg.neck_dim, cfg.neck_dropout)
        self.head = nn.Linear(cfg.neck_dim, cfg.num_clusters)
        with torch.no_grad():  # official ``ClsHead.init_weights(init_linear='normal')``: N(0, 0.01^2), bias 0
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
            self.head.bias.zero_()
        k, d = cfg.num_clusters, cfg.neck_dim
        self.register_buffer("memory_features", torch.zeros(0, d))  # (N, D_z) samples memory, set by setup
        self.register_buffer("memory_labels", torch.full((0,), -1, dtype=torch.long))  # (N,), -1 until clustered
        self.register_buffer("centroids", torch.zeros(k, d))  # (K, D_z) centroids memory
        self.register_buffer("weights", torch.full((k,), 1.0 / k))  # (K,) loss weights w_c
        # the normalised value of black, the rotation's fill (``set_normalization``)
        self.register_buffer("fill", -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]),
                             persistent=False)

    def set_normalization(self, mean, std) -> None:
        self.fill = -torch.as_tensor(mean, dtype=torch.float32) / torch.as_tensor(std, dtype=torch.float32)

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The samples memory: one feature and one label per training image."""
        if num_samples < self.cfg.num_clusters:
            raise ValueError(f"num_clusters {self.cfg.num_clusters} is above the {num_samples} training images")
        device = self.centroids.device
        self.memory_features = torch.zeros(num_samples, self.cfg.neck_dim, device=device)
        self.memory_labels = torch.full((num_samples,), -1, dtype=torch.long, device=device)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))  # (N, D_z)

    @torch.no_grad()
    def init_memory(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The memories after the initial clustering (official ``init_memory``): rank 0's features (N, D_z),
        l2-normalised, and labels (N,); centroids their means; the loss weights of the labels."""
        features = _broadcast(F.normalize(features.float(), dim=1).to(self.centroids.device).contiguous())
        labels = _broadcast(labels.to(self.centroids.device).contiguous())
        self.memory_features.copy_(features)
        self.memory_labels.copy_(labels)
        self.centroids.copy_(_broadcast(cluster_means(features, labels, self.centroids)))
        self.weights.copy_(cluster_weights(labels, self.cfg.num_clusters, self.cfg.reweight_power))

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """Before the first epoch only: k-means of the whole training set's l2-normalised projections (the
        official ``DeepClusterHook(initial=True, pca_dim=-1)``), which initialises both memories."""
        if epoch != 0:
            return
        x = F.normalize(features(self.project).to(self.centroids.device).float(), dim=1)  # (N, D_z)
        labels, _ = kmeans(x, self.cfg.num_clusters, self.cfg.kmeans_iterations, torch.Generator().manual_seed(17))
        self.init_memory(x, labels)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        index = batch["index"].to(self.memory_labels.device)  # (B,)
        labels = self.memory_labels[index]  # (B,) memory labels before this batch's update
        if len(self.memory_labels) == 0 or bool((labels < 0).any()):
            raise RuntimeError("ODC has no memory yet: setup() and on_epoch_start(0, ...) (the initial "
                               "clustering) must run before the first step")
        x = random_rotation(batch["views"][0], cfg.rotation_degrees, self.fill)  # (B, C, H, W)
        z = self.project(x)  # (B, D_z)
        logits = self.head(z)  # (B, K)
        world, _ = _world()
        all_index = concat_all_gather(index)  # (world B,)
        total = self.weights[self.memory_labels[all_index]].sum() / world  # global weight sum / ranks
        loss = odc_loss(logits, labels, self.weights, total)
        with torch.no_grad():
            all_z = concat_all_gather(z.detach().float())  # (world B, D_z)
            new = memory_update(self.memory_features[all_index], all_z, cfg.memory_momentum)  # Sec. 3.2
            self.memory_features[all_index] = new
            new_labels = nearest_centroid(new, self.centroids)  # (world B,) re-assignment
            change = (new_labels != self.memory_labels[all_index]).float().mean()
            self.memory_labels[all_index] = new_labels
            acc = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "pseudo_label_acc": acc, "change_ratio": change}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """The official ``ODCHook.after_train_iter``: centroids from the memory every
        ``centroids_update_interval`` steps, the small-cluster fix, then the loss weights of the labels."""
        cfg = self.cfg
        if len(self.memory_labels) == 0 or bool((self.memory_labels < 0).any()):
            return
        if step % cfg.centroids_update_interval == 0:
            self.centroids.copy_(_broadcast(cluster_means(self.memory_features, self.memory_labels, self.centroids)))
        if step % cfg.small_clusters_interval == 0:
            labels, centroids = fix_small_clusters(self.memory_features, self.memory_labels, self.centroids,
                                                   cfg.min_cluster_size, cfg.kmeans_iterations,
                                                   torch.Generator().manual_seed(step))
            self.memory_labels.copy_(_broadcast(labels))  # on every rank, whether or not it changed
            self.centroids.copy_(_broadcast(centroids))
        self.weights.copy_(cluster_weights(self.memory_labels, cfg.num_clusters, cfg.reweight_power))

    def param_groups(self) -> list[dict]:
        """Weight decay on every parameter (official); the classification head without momentum (official
        ``paramwise_options={'\\Ahead.': dict(momentum=0.)}``)."""
        head = list(self.head.parameters())
        own = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        wd = self.cfg.weight_decay
        return [{"params": rest, "weight_decay": wd}, {"params": head, "weight_decay": wd, "momentum": 0.0, "lars": False}]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (N, D)."""
        return self.backbone(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The classification head's predicted cluster of each image, (N,)."""
        return self.head(self.project(x)).argmax(dim=1)


MODEL = ODC


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    labels = torch.cat([torch.zeros(190, dtype=torch.long), torch.arange(1, 5).repeat_interleave(2), torch.tensor([5, 5])])
    cents = cluster_means(feats, labels, torch.zeros(6, 8))
    fixed, _ = fix_small_clusters(feats, labels, cents, 5, 20, g)
    print("cluster sizes before and after the small-cluster fix:", torch.bincount(labels, minlength=6).tolist(),
          torch.bincount(fixed, minlength=6).tolist())
