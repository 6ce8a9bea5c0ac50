"""PCL — Li, Zhou, Xiong, Hoi. "Prototypical Contrastive Learning of Unsupervised Representations".
ICLR 2021, arXiv:2005.04966. Catalog id: ``pcl``. Official code: https://github.com/salesforce/PCL
(``main_pcl.py``: ``run_kmeans`` and the training loop; ``pcl/builder.py``: the model). This file is PCL v2
(MoCo v2's MLP head, blur and tau = 0.2, the official README's command); ``PRESETS["v1"]`` is PCL v1.

Expectation-maximisation over prototypes (Sec. 3.2-3.3). E-step, at the start of every epoch after the
first ``proto_warmup_epochs``: the momentum encoder embeds the whole training set (centre crops) into
l2-normalised v'_z, and k-means at M granularities (K_1, ..., K_M clusters) gives the prototypes c^m (the
centroids, l2-normalised), each image's cluster s^m(i), and each cluster's concentration (Eq. 12)

    phi = sum_{z=1}^{Z} || v'_z - c ||_2 / (Z log(Z + alpha)),   alpha = 10,

over its Z members; as the official ``run_kmeans``: a cluster of at most one image takes the largest phi
of the others, phi is clipped to its 10th and 90th percentiles, then scaled so that its mean is tau.
M-step: the query encoder (backbone + head) embeds one view into v_i, the momentum encoder the other into
v'_i, and ProtoNCE (Eq. 11), averaged over the batch, is

    L = - log exp(v_i . v'_i / tau) / sum_{j=0}^{r} exp(v_i . v'_j / tau)
        - 1/M sum_m log exp(v_i . c^m_s / phi^m_s) / sum_{j=0}^{r} exp(v_i . c^m_j / phi^m_j),

the first term MoCo's InfoNCE against a queue of r earlier keys, the second a softmax over the sample's
own prototype c^m_s and r negative prototypes, each with its own concentration as temperature (a loose
cluster, large phi, is contrasted more softly). The negatives follow ``pcl/builder.py``: the prototypes of
the other samples of the batch, plus r drawn uniformly from the prototypes that are no sample's own.
Before the first E-step only the InfoNCE term is used (official ``--warmup-epoch 20``). The momentum
encoder follows the query encoder, theta' <- m theta' + (1 - m) theta (MoCo Eq. 2), and takes no gradient.

Collapse: the queued keys and the negative prototypes are in the denominators, so a constant embedding
costs log(r + 1) in InfoNCE; phi's normalisation to mean tau keeps the prototype term from sharpening or
flattening every cluster at once, and the per-cluster phi keeps loose clusters from being pulled tight.
The prototypes, concentrations and assignments are fixed during an epoch and take no gradient.

Distributed: InfoNCE is per query against a queue that is the same on every rank (keys gathered over
ranks before they are enqueued, with shuffling BN as in MoCo: one permutation of the global batch,
broadcast from rank 0, ``bn_splits`` sub-batches in one process). The prototype term is per sample: the
batch's sample indices are gathered, so that the prototype columns are those of the global batch, and
the r drawn negatives are drawn on rank 0 and broadcast. The E-step runs on every rank (each computes
the whole training set's features) and rank 0's prototypes, concentrations and assignments are
broadcast (official ``main_pcl.py``), so every rank holds the same buffers.

Deviations:
- the prototype columns are those of the global batch, each prototype once; the official code takes the
  per-GPU batch's positive prototypes once per sample (a prototype shared by two samples appears twice,
  and the copy counts as a negative of both). With counting once, the term is Eq. 11 with the other
  samples' prototypes among the negatives. Where fewer than r prototypes are left outside the batch, all
  are used (the official ``random.sample`` raises);
- k-means is deepcluster.py's torch Lloyd (random data points as initial centroids, 20 iterations,
  empty clusters split), best of ``kmeans_restarts`` runs by objective as faiss ``nredo = 5``, not faiss
  on a GPU; faiss's subsampling to 1000 points per centroid does not apply at the official sizes
  (1.28M images < 25,000 x 1,000); each granularity's generator is seeded by its position, as the
  official ``clus.seed`` (the same seed every epoch);
- the queue and the momentum encoder are updated in ``on_step_end`` (moco.py's order of updates);
- the harness's cosine schedule (PCL v2's ``--cos``; v1 dropped the rate 10x at epochs 120 and 160), and
  biases and norm parameters get no weight decay (official: all parameters);
- the Gaussian blur is dropped below 64 px (SimCLR's CIFAR-10 setting, as moco.py), and the random
  resized crop is bilinear so that it runs batched on the device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    num_clusters: tuple[int, ...] = (25000, 50000, 100000)
    """K_1..K_M, the k-means granularities (official ``--num-cluster 25000,50000,100000``, Sec. 5)."""
    proto_warmup_epochs: int = 20
    """Epochs of InfoNCE only before the first E-step (official ``--warmup-epoch 20``)."""
    temperature: float = 0.2
    """tau of InfoNCE and the mean of phi: 0.2 for PCL v2 (official README, ``--temperature 0.2``);
    0.1 for v1 (``pcl/builder.py``'s default ``T``)."""
    alpha: float = 10.0
    """alpha of Eq. 12, which keeps small clusters' phi from growing (official ``np.log(len(dist)+10)``)."""
    queue_size: int = 16384
    """r, the queued negative keys of InfoNCE (official ``--pcl-r 16384``)."""
    num_negative_prototypes: int = 16384
    """r, the negative prototypes drawn per granularity (the same official ``--pcl-r 16384``)."""
    kmeans_iterations: int = 20
    """Lloyd iterations per k-means (official ``clus.niter = 20``)."""
    kmeans_restarts: int = 5
    """k-means runs per granularity, the one of lowest objective kept (official ``clus.nredo = 5``)."""
    key_momentum: float = 0.999
    """m of the momentum encoder (official ``--moco-m 0.999``)."""
    mlp: bool = True
    """PCL v2's MLP head (official ``--mlp``); False: v1's linear fc."""
    proj_hidden_dim: int = 2048
    """Hidden width of the MLP head: the backbone's 2048 features of a ResNet-50 (official ``dim_mlp``)."""
    proj_dim: int = 128
    """Dimension of the embeddings and prototypes (official ``--low-dim 128``)."""
    aug_plus: bool = True
    """MoCo v2's views (official ``--aug-plus``: jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, blur p=0.5);
    False: v1's (grayscale, jitter (0.4, 0.4, 0.4, 0.4) on every image)."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official ``scale=(0.2, 1.)``)."""
    bn_splits: int = 1
    """BN sub-batches per process for shuffling BN (1: one per GPU, as the official DDP code)."""
    optimizer: str = "sgd"
    """SGD (official ``torch.optim.SGD``)."""
    base_lr: float = 0.03
    """Official ``--lr 0.03`` at ``--batch-size 256``."""
    weight_decay: float = 1e-4
    """Official ``--wd 1e-4``."""
    momentum: float = 0.9
    """Official ``--momentum 0.9``."""
    warmup_epochs: int = 0
    """No learning-rate warm-up (official ``adjust_learning_rate``)."""
    epochs: int = 200
    """Official ``--epochs 200``."""
    batch_size: int = 256
    """Official ``--batch-size 256``, over the GPUs of a node."""
    sync_batchnorm: bool = False
    """Per-GPU BN with shuffling, as MoCo."""


PRESETS = {
    # PCL v1: linear head, tau 0.1, MoCo v1's views (official code without --mlp --aug-plus --cos).
    "v1": dict(mlp=False, temperature=0.1, aug_plus=False),
    # CPU runs on the embedded digits (1,437 images of 32 px, 10 classes, batch 64, 15 epochs = 330 steps):
    # - num_clusters (10, 20, 40): over-clustering as the paper's 25-100 clusters per ImageNet class would
    #   give 1-6 images per cluster here; 1-4 clusters per class keep clusters of 36-144 images;
    # - proto_warmup_epochs 3: the official 20 of 200 epochs is 10%, i.e. 1.5 epochs; 3 give the momentum
    #   encoder 66 steps before its first clustering;
    # - queue_size 1024, key_momentum 0.99, bn_splits 2, min_scale 0.4: as moco.py's small preset (a queue
    #   below the 1,437 images; m 0.999 would move the momentum encoder only 28% of the way in 330 steps;
    #   BN sub-batches of 32 images; 20% crops of an 8x8 digit upscaled to 32 px are a blob);
    # - num_negative_prototypes stays: with 40 clusters or fewer every prototype is a column anyway.
    "small": dict(num_clusters=(10, 20, 40), proto_warmup_epochs=3, queue_size=1024, key_momentum=0.99,
                  bn_splits=2, min_scale=0.4),
}


# --- augmentations (official ``main_pcl.py``, ``augmentation``) -----------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """The query and the key view, both from one distribution, in the official order: crop, colour jitter,
    grayscale (p=0.2), blur (v2, p=0.5), flip; v1 puts grayscale before an unconditional jitter. It takes a
    PIL image or a uint8 tensor."""
    steps = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True)]
    if cfg.aug_plus:
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        if image_size >= 64:
            kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd (SimCLR App. A)
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    else:
        steps += [v2.RandomGrayscale(p=0.2), v2.ColorJitter(0.4, 0.4, 0.4, 0.4)]
    steps += [v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads ----------------------------------------------------------------------------------------


def head(in_dim: int, cfg: Config) -> nn.Module:
    """v2: Linear - ReLU - Linear (v2, "MLP head"; no BN, as in the official code); v1: one Linear."""
    if not cfg.mlp:
        return nn.Linear(in_dim, cfg.proj_dim)
    hidden = cfg.proj_hidden_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cfg.proj_dim))


# --- E-step: k-means and the concentration phi (official ``run_kmeans``) --------------------------


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


@torch.no_grad()
def best_kmeans(x: torch.Tensor, k: int, iterations: int, restarts: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest-objective (sum of squared distances) of ``restarts`` k-means runs of x (N, D), drawn one
    after the other from ``generator`` (faiss ``nredo``): (labels (N,), centroids (k, D))."""
    best, best_obj = None, math.inf
    for _ in range(max(1, restarts)):
        labels, centroids = kmeans(x, k, iterations, generator)
        obj = float(((x - centroids[labels]) ** 2).sum())
        if obj < best_obj:
            best, best_obj = (labels, centroids), obj
    return best


@torch.no_grad()
def concentration(distances: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, alpha: float = 10.0) -> torch.Tensor:
    """phi (k,) of Eq. 12 from each point's distance ||v'_z - c|| (N,) to its centroid and its cluster
    (N,), in float64: sum of distances / (Z log(Z + alpha)) for clusters of Z > 1 points; a cluster of at
    most one point takes the largest of those; then clipped to the 10th-90th percentiles ("for
    stability") and scaled to mean ``temperature`` (official ``run_kmeans``)."""
    d = distances.double()
    counts = torch.bincount(labels, minlength=k).double()  # (k,) Z
    sums = torch.zeros(k, dtype=torch.float64, device=d.device).index_add_(0, labels, d)  # (k,)
    big = counts > 1
    phi = torch.zeros(k, dtype=torch.float64, device=d.device)
    phi[big] = sums[big] / (counts[big] * torch.log(counts[big] + alpha))  # Eq. 12
    if not bool(big.any()):  # no cluster with two points: nothing to estimate from, the mean is all there is
        return torch.full((k,), float(temperature), dtype=torch.float64, device=d.device)
    phi[~big] = phi[big].max()
    q = torch.quantile(phi, torch.tensor([0.1, 0.9], dtype=torch.float64, device=d.device))  # numpy's linear
    phi = phi.clamp(q[0], q[1])
    return temperature * phi / phi.mean()


@torch.no_grad()
def cluster(v: torch.Tensor, k: int, cfg: Config, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One granularity of the E-step on the momentum features v (N, D): (assignments (N,), prototypes
    (k, D) l2-normalised, phi (k,)). The distances for phi are to the unnormalised centroids, as faiss's
    ``index.search`` returns them; the prototypes are normalised afterwards (official ``run_kmeans``)."""
    v = v.float()
    labels, centroids = best_kmeans(v, k, cfg.kmeans_iterations, cfg.kmeans_restarts, generator)
    distances = (v - centroids[labels]).norm(dim=1)  # (N,) ||v'_z - c||
    phi = concentration(distances, labels, k, cfg.temperature, cfg.alpha)
    return labels, F.normalize(centroids, dim=1), phi.float()


# --- losses ---------------------------------------------------------------------------------------


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """The instance term of Eq. 11 (MoCo's InfoNCE), averaged over the N queries. q: (N, D) queries;
    k: (N, D) positive keys; queue: (r, D) negative keys. All are l2-normalised here; no gradient flows
    into k or the queue."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    negatives = F.normalize(queue.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ negatives.T  # (N, r)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + r)
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)


def prototype_nce(q: torch.Tensor, prototypes: torch.Tensor, phi: torch.Tensor, labels: torch.Tensor,
                  columns: torch.Tensor) -> torch.Tensor:
    """The prototype term of Eq. 11 for one granularity, averaged over the N queries: a softmax of
    v_i . c_j / phi_j over the prototypes j in ``columns`` (K,) bool, whose target is the sample's own
    prototype labels (N,) (which ``columns`` must contain). q: (N, D), normalised here; prototypes: (K, D)
    unit rows; phi: (K,). The prototypes and phi take no gradient."""
    q = F.normalize(q, dim=1)
    idx = columns.nonzero().squeeze(1)  # (C,) the prototypes scored
    position = torch.cumsum(columns.long(), 0) - 1  # (K,) each prototype's column among them
    logits = q @ prototypes.detach()[idx].to(q.dtype).T / phi.detach()[idx].to(q.dtype)  # (N, C)
    return F.cross_entropy(logits, position[labels])


def protonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                  clusters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11: InfoNCE plus the mean over the M granularities of the prototype term; ``clusters`` holds
    (prototypes (K, D), phi (K,), labels (N,), columns (K,)) per granularity, empty before the first
    E-step (InfoNCE alone). Returns (loss, the prototype term or 0)."""
    loss = info_nce(q, k, queue, temperature)
    if not clusters:
        return loss, torch.zeros((), device=q.device)
    proto = torch.stack([prototype_nce(q, c, phi, y, cols) for c, phi, y, cols in clusters]).mean()
    return loss + proto, proto


# --- negative prototypes, queue and momentum encoder ----------------------------------------------


@torch.no_grad()
def prototype_columns(batch_labels: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """(K,) bool: the prototypes of the (global) batch's samples batch_labels (N,), plus r drawn
    uniformly from the others (all of them where fewer remain; official ``pcl/builder.py``). The draw
    uses the global RNG and is broadcast from rank 0, so that every rank scores the same prototypes."""
    columns = torch.zeros(k, dtype=torch.bool, device=batch_labels.device)
    columns[batch_labels] = True
    others = (~columns).nonzero().squeeze(1)  # (K - U,)
    if r >= len(others):  # the same on every rank: the batch labels are global
        columns[others] = True
        return columns
    drawn = torch.zeros(k, dtype=torch.uint8, device=columns.device)
    drawn[others[torch.randperm(len(others), device=others.device)[:r]]] = 1
    if _world()[0] > 1:
        dist.broadcast(drawn, src=0)
    return columns | drawn.bool()


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
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


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


def encode_in_groups(encoder: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """encoder on ``groups`` sub-batches of x, so that BN normalises each one with its own statistics,
    as one of several GPUs would; one call when groups is 1."""
    if groups <= 1:
        return encoder(x)
    return torch.cat([encoder(chunk) for chunk in x.chunk(groups)])


@torch.no_grad()
def shuffled_keys(encoder_k: nn.Module, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffling BN (v1 Sec. 3.3): encode the key views x (N, C, H, W) of a permutation of the global
    batch, so that no key shares BN statistics with its query. Returns the L2-normalised keys in batch
    order: (this rank's (N, D), every rank's (N_global, D))."""
    x_all = concat_all_gather(x)  # (N_global, C, H, W)
    perm = torch.randperm(len(x_all), device=x.device)
    rank = 0
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(perm, 0)  # one permutation on every rank
        rank = dist.get_rank()
    n = len(x)
    mine = perm[rank * n : (rank + 1) * n]  # the samples this rank encodes
    k = F.normalize(encode_in_groups(encoder_k, x_all[mine], groups).float(), dim=1)  # (N, D)
    k_all = concat_all_gather(k)[torch.argsort(perm)]  # (N_global, D), unshuffled
    return k_all[rank * n : (rank + 1) * n], k_all


# --- model ----------------------------------------------------------------------------------------


class PCL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.encoder_q = nn.Sequential(backbone, head(feature_dim, cfg))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # the momentum encoder
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))  # (r, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # the E-step's results, one set per granularity; random unit prototypes until the first one (for
        # ``assign`` on an untrained model), from a fixed generator so that every rank holds the same
        g = torch.Generator().manual_seed(0)
        for m, k in enumerate(cfg.num_clusters):
            self.register_buffer(f"prototypes_{m}", F.normalize(torch.randn(k, cfg.proj_dim, generator=g), dim=1))
            self.register_buffer(f"phi_{m}", torch.full((k,), cfg.temperature))
        self.register_buffer("assignments", torch.zeros(len(cfg.num_clusters), 0, dtype=torch.long))  # (M, N)
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))  # False: InfoNCE only
        self.pending_keys: torch.Tensor | None = None  # this step's global keys, enqueued in on_step_end

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q[0]

    def prototypes(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototypes (K_m, D), phi (K_m,)) of granularity m."""
        return getattr(self, f"prototypes_{m}"), getattr(self, f"phi_{m}")

    def setup(self, num_samples: int, num_classes: int) -> None:
        """Room for each training image's cluster at every granularity; unset (-1) until the first E-step."""
        if num_samples < max(self.cfg.num_clusters):
            raise ValueError(f"num_clusters {self.cfg.num_clusters} has more clusters than the {num_samples} training images")
        self.assignments = torch.full((len(self.cfg.num_clusters), num_samples), -1, dtype=torch.long,
                                      device=self.queue.device)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x_q, x_k = batch["views"][:2]  # (N, C, H, W) each
        q = F.normalize(encode_in_groups(self.encoder_q, x_q, cfg.bn_splits), dim=1)  # (N, D) v_i
        k, k_all = shuffled_keys(self.encoder_k, x_k, cfg.bn_splits)  # (N, D) v'_i, (N_global, D)
        clusters = []
        if bool(self.clustered):
            index = batch["index"].to(self.assignments.device)  # (N,)
            index_all = concat_all_gather(index)  # (N_global,): the global batch's prototypes are columns
            for m in range(len(cfg.num_clusters)):
                prototypes, phi = self.prototypes(m)
                columns = prototype_columns(self.assignments[m, index_all], len(phi), cfg.num_negative_prototypes)
                clusters.append((prototypes, phi, self.assignments[m, index], columns))
        loss, proto = protonce_loss(q, k, self.queue, cfg.temperature, clusters)  # Eq. 11
        self.pending_keys = k_all
        with torch.no_grad():
            pos_sim = (q * k).sum(dim=1).mean()
        return {"loss": loss, "proto_loss": proto.detach(), "pos_sim": pos_sim}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the momentum encoder follows the query encoder (MoCo Eq. 2) and the
        batch's keys are enqueued. A loop of one's own must call this after every step."""
        ema_update(self.encoder_k, self.encoder_q, self.cfg.key_momentum)
        if self.pending_keys is not None:
            enqueue(self.queue, self.queue_ptr, self.pending_keys)
            self.pending_keys = None

    @torch.no_grad()
    def momentum_features(self, x: torch.Tensor) -> torch.Tensor:
        """v'(x): the momentum encoder's l2-normalised embedding (N, D), what the E-step clusters
        (official ``forward(is_eval=True)``)."""
        return F.normalize(self.encoder_k(x).float(), dim=1)

    @torch.no_grad()
    def set_clusters(self, assignments: list[torch.Tensor], prototypes: list[torch.Tensor], phis: list[torch.Tensor]) -> None:
        """Install an E-step's results: per granularity, assignments (N,), prototypes (K, D) and phi (K,)."""
        for m, (labels, c, phi) in enumerate(zip(assignments, prototypes, phis)):
            own_c, own_phi = self.prototypes(m)
            own_c.copy_(c)
            own_phi.copy_(phi)
            self.assignments[m].copy_(labels)
        self.clustered.fill_(True)

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """The E-step, every epoch from ``proto_warmup_epochs`` on: k-means at each granularity of the
        whole training set's momentum features ``features(self.momentum_features)`` (N, D), then phi
        (Eq. 12); rank 0's results are broadcast. Before: InfoNCE only."""
        cfg = self.cfg
        if epoch < cfg.proto_warmup_epochs:
            self.clustered.fill_(False)
            return
        device = self.queue.device
        v = features(self.momentum_features).to(device)  # (N, D), unit rows
        # official ``clus.seed = m``: granularity m's generator, seeded alike every epoch
        results = [cluster(v, k, cfg, torch.Generator().manual_seed(m)) for m, k in enumerate(cfg.num_clusters)]
        if _world()[0] > 1:  # one clustering for all ranks (official: run_kmeans on the master node)
            for tensors in results:
                for t in tensors:
                    dist.broadcast(t, src=0)
        self.set_clusters(*[list(t) for t in zip(*results)])

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The query encoder's pooled features (the head is dropped for evaluation, official
        ``eval_cls_imagenet.py``)."""
        return self.backbone(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest prototype (cosine) of the coarsest granularity to each image's momentum
        embedding, (N,)."""
        m = min(range(len(self.cfg.num_clusters)), key=lambda i: self.cfg.num_clusters[i])
        return (self.momentum_features(x) @ self.prototypes(m)[0].T).argmax(dim=1)


MODEL = PCL


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels, protos, phi = cluster(v, 8, Config(), g)
    print("cluster sizes:", torch.bincount(labels, minlength=8).tolist(), "phi mean:", round(float(phi.mean()), 4))
