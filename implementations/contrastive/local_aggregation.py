"""Local Aggregation — Zhuang, Zhai, Yamins. "Local Aggregation for Unsupervised Learning of Visual Embeddings".
ICCV 2019, arXiv:1903.12355. Catalog id: ``local-aggregation``.
Official code: https://github.com/neuroailab/LocalAggregation (TensorFlow; ``model/instance_model.py``,
``model/cluster_km.py``, ``param_setter.py``, ``exp_configs/la_final.json``).

The network maps x_i to v_i = normalise(W g(x_i)), a unit vector in 128-d (the classifier replaced by a
128-d layer, as Instance Discrimination), and a memory bank holds a running average v_bar_j of every training
image's embedding. Probabilities are the non-parametric softmax over the bank (Sec. 3.1):

    P(i | v) = exp(v_bar_i . v / tau) / sum_{j=1..n} exp(v_bar_j . v / tau),             (1)
    P(A | v) = sum_{i in A} P(i | v),                                                     (2)

and LA maximises, for each image, the probability of its close neighbours C_i among its background
neighbours B_i:

    L(C_i, B_i | theta, x_i) = -log( P(C_i n B_i | v_i) / P(B_i | v_i) )                 (3)

(plus lambda ||theta||^2, Eq. 4: the optimizer's weight decay). The normaliser of (1) cancels in the ratio,
so (3) is logsumexp over B_i minus logsumexp over C_i n B_i of v_bar_j . v_i / tau.
- B_i: the k bank entries nearest to v_i (largest v_bar_j . v_i), k = 4096, recomputed every step.
- C_i: the images that share i's cluster in at least one of m k-means clusterings of the bank (union over
  runs), m = 10 runs of 30,000 clusters with different seeds for ResNets, recomputed every epoch. Held as a
  (m, n) label buffer; the mask "j in C_i" for the batch's (N, k) background neighbours compares labels.
- Bank update after each step, without gradient: v_bar_i <- normalise(mu v_bar_i + (1 - mu) v_i), mu = 0.5.
- Warm start: the first 10 epochs train Instance Recognition, -log P(i | v_i) (Wu et al. 2018), which is (3)
  with C_i = {i} and B_i the whole bank; LA starts with the first clustering of the bank it leaves behind.
Until the first clustering the labels are the identity (each image its own cluster), as in the official
code, so that (3) would then be IR restricted to B_i.

Collapse: B_i are negatives. If every embedding were the same, B_i would be k arbitrary entries, nearly
all outside C_i, and P(C_i n B_i) / P(B_i) ~ |C_i n B_i| / k, a large loss; only separating C_i from the rest
of B_i lowers it. Because B_i is local, images far from v_i exert no force, so clusters of different sizes
can form; the several clusterings keep C_i from being one k-means partition's hard boundary.

Distributed: the bank and the cluster labels must be the same on every rank. The bank is written with the
indices and embeddings of the GLOBAL batch (all-gathered without gradient, the same rows on every rank); the
k-means labels are computed from the bank and broadcast from rank 0. Each sample's loss needs only v_i, the
bank and the labels, so the mean of the per-rank means is the global batch's loss and DDP's gradient
averaging does the rest.

Deviations:
- Instance Recognition warm start: the exact softmax over the bank (Wu et al.'s Eq. 2 of that paper), not the
  NCE approximation with 4,096 noise samples and a fixed normaliser of the official ``get_IR_losses``: LA
  scores the whole bank each step anyway (for B_i), so the exact softmax costs nothing more, and NCE with a
  fixed normaliser diverges on small data sets (see instdisc.py's small preset);
- a sample whose C_i n B_i is empty (its own bank entry outside its k nearest) adds 0 to the batch mean; the
  official code adds 1e-7 to the ratio, which gives such a sample the constant -log 1e-7 and, as here, no
  gradient;
- k-means is the short torch implementation shared with deepcluster.py (random data points as initial
  centroids, 20 Lloyd iterations, empty clusters split), run on the training device, not faiss; the seed of
  run r is 1234 + r as in the official ``cluster_km.py``;
- bank initialisation: uniform in [-sqrt(3/D), sqrt(3/D)] as the official code draws it, then normalised
  (as the official PyTorch port does);
- the learning rate: the harness decays it with a cosine; the official schedule is 0.03 divided by 10 at
  two steps near the end (``lr_boundaries``);
- the horizontal flip comes right after the crop instead of last: it commutes with the per-pixel colour
  operations, so the distribution of views is unchanged, and crop and flip can run per image on large data;
- evaluation uses the backbone features (``embed``); the paper's k-NN uses the bank;
- biases and BN parameters get no weight decay (the harness's groups; the official TF code exempts BN only).

Cost per step: v @ bank^T over the whole bank, (N, n), a top-k of it, and an (m, N, k) label comparison;
per clustering, m k-means runs on the (n, 128) bank.
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
    dim: int = 128
    """Dimension of the normalised embedding v and of the bank entries (Sec. 3.1; official: 128, hard-coded)."""
    background_k: int = 4096
    """k, the number of background neighbours B_i (official ``instance_k 4096``); at most n is used."""
    num_kmeans: int = 10
    """m, the number of k-means clusterings whose union gives C_i (official res18_LA/res50_LA: ten values in
    ``kmeans_k``; AlexNet uses 3, VGG 6)."""
    kmeans_k: int = 30000
    """Clusters of each k-means run (official res18_LA/res50_LA ``kmeans_k`` 30000; VGG 10000)."""
    kmeans_iterations: int = 20
    """Lloyd iterations of each run (official ``cluster_km.py``: ``clus.niter = 20``)."""
    kmeans_every: int = 1
    """Epochs between two clusterings of the bank (official ``train_loop``: every ``NUM_BATCHES_PER_EPOCH``)."""
    ir_epochs: int = 10
    """Epochs of Instance Recognition before LA (official README: IR for 10 epochs as a warm start)."""
    temperature: float = 0.07
    """tau of the softmax (official ``instance_t 0.07``)."""
    bank_momentum: float = 0.5
    """mu in v_bar <- normalise(mu v_bar + (1 - mu) v) (official ``instance_m 0.5``)."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official ``preprocessing_inst``: size_minval 0.2)."""
    optimizer: str = "sgd"
    """SGD with momentum (official ``param_setter.py``: MomentumOptimizer)."""
    base_lr: float = 0.06
    """Per 256 images: the official 0.03 at batch 128 (``init_lr 0.03``, ``batch_size 128``)."""
    weight_decay: float = 1e-4
    """lambda of Eq. 4 (official ``weight_decay 1e-4``, L2 on all but BN parameters)."""
    momentum: float = 0.9
    """Official ``param_setter.py``."""
    warmup_epochs: int = 0
    """No warm-up: the rate starts at 0.03 (official)."""
    epochs: int = 200
    """IR and LA together (official res18_LA: ``train_num_steps 2001800`` at 10,009 steps an epoch)."""
    batch_size: int = 128
    """Official ``batch_size 128``."""
    sync_batchnorm: bool = False
    """The official code trains on one GPU: BN statistics of its batch."""


# Small-scale preset for CPU runs on the embedded digits (1,437 images, 32 px, batch 64, 15 epochs = 330
# steps, small_cnn):
# - background_k 256: 4,096 exceeds the 1,437 images; ImageNet's B_i is 0.3% of the bank (4 images here),
#   256 is 18%, about twice a digit class;
# - kmeans_k 40: 30,000 clusters are 43 images each on ImageNet, 40 give 36 here (four per class);
# - ir_epochs 5: a third of the run (10 of 200 epochs on ImageNet are 100,000 IR steps; here 5 are 110), so
#   that the bank is clustered after the network has begun to spread it (not tuned);
# - temperature 0.2, base_lr 0.003, min_scale 0.4, as instdisc.py's small preset (the same bank and IR stage):
#   with the three changes above but the paper's tau 0.07, rate 0.06 and scale 0.2 the run ended at k-NN
#   0.647 (random init 0.839); with these, 0.867.
PRESETS = {"small": dict(background_k=256, kmeans_k=40, ir_epochs=5, temperature=0.2, base_lr=0.003, min_scale=0.4)}


# --- augmentations (official ``preprocessing_inst``: crop, grayscale, colour jitter, flip) -------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view per image: random resized crop (scale 0.2-1), flip, grayscale (p=0.2), colour jitter 0.4
    (always, random order), as the official ``preprocessing_inst`` (flip moved forward, see Deviations)."""
    return [
        v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])
    ]


# --- distributed helpers (no gradient: the bank and the labels are constants of the loss) -------------


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


@torch.no_grad()
def update_bank(bank: torch.Tensor, index: torch.Tensor, x: torch.Tensor, momentum: float) -> None:
    """bank[i] <- normalise(m bank[i] + (1 - m) x_i) at the rows ``index`` (N,), in place; x: (N, D)."""
    v = momentum * bank[index] + (1 - momentum) * x.to(bank.dtype)  # (N, D)
    bank.index_copy_(0, index, F.normalize(v, dim=1))


# --- k-means (copied from deepcluster.py) -----------------------------------------------------------


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
def cluster_bank(bank: torch.Tensor, runs: int, k: int, iterations: int, seed: int = 1234) -> torch.Tensor:
    """(runs, n) labels of ``runs`` k-means clusterings of the bank (n, D) into k clusters each, run r
    seeded with seed + r (official ``Kmeans.recompute_clusters``)."""
    return torch.stack([kmeans(bank, k, iterations, torch.Generator().manual_seed(seed + r))[0] for r in range(runs)])


# --- neighbours and losses ------------------------------------------------------------------------------


def background_neighbours(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B_i: the k bank entries most similar to each v_i. sim: (N, n) v_i . v_bar_j. Returns their
    similarities (N, k), which keep the gradient, and their bank indices (N, k)."""
    return sim.topk(k, dim=1, sorted=False)


@torch.no_grad()
def close_neighbours(labels: torch.Tensor, index: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: neighbour j of sample i is in C_i, i.e. shares i's cluster in at least one k-means run.
    labels: (m, n) cluster of every bank entry in each run; index: (N,) the samples; neighbours: (N, K)."""
    own = labels[:, index].unsqueeze(2)  # (m, N, 1)
    theirs = labels[:, neighbours]  # (m, N, K)
    return (own == theirs).any(dim=0)  # the union over runs


def local_aggregation_loss(sim: torch.Tensor, close: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 3 averaged over the batch: -log P(C_i n B_i | v_i) / P(B_i | v_i). sim: (N, K) v_bar_j . v_i for
    the K entries j of B_i; close: (N, K) bool, j in C_i. A row with no close neighbour in B_i adds 0."""
    close = close | ~close.any(dim=1, keepdim=True)  # empty C_i n B_i: the ratio 1, loss 0 and no gradient
    logits = sim / temperature  # (N, K); the normaliser of Eq. 1 cancels in the ratio
    log_b = logits.logsumexp(dim=1)  # (N,) log P(B_i | v_i) + log Z
    log_cb = logits.masked_fill(~close, -math.inf).logsumexp(dim=1)  # (N,) log P(C_i n B_i | v_i) + log Z
    return (log_b - log_cb).mean()


def instance_recognition_loss(sim: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """IR, -log P(i | v_i) over the whole bank (Eq. 1), averaged: Eq. 3 with C_i = {i}, B_i = all.
    sim: (N, n) v_i . v_bar_j; index: (N,)."""
    return F.cross_entropy(sim / temperature, index)


# --- model ------------------------------------------------------------------------------------------------


class LocalAggregation(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = nn.Linear(feature_dim, cfg.dim)  # the classifier replaced by a 128-d layer
        self.register_buffer("bank", torch.empty(0, cfg.dim))  # (n, D), sized in setup()
        self.register_buffer("cluster_labels", torch.empty(cfg.num_kmeans, 0, dtype=torch.long))  # (m, n)
        self.register_buffer("aggregating", torch.tensor(False))  # False: IR warm start; True: LA
        self._aggregating: bool | None = None  # caches the flag so that forward does not read the device

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The bank: one unit random vector per training image (official ``MemoryBank._create``, then
        normalised); cluster labels: the identity in every run (official ``build_targets``)."""
        cfg, device = self.cfg, self.projector.weight.device
        stdv = 1.0 / math.sqrt(cfg.dim / 3)
        bank = torch.rand(num_samples, cfg.dim, device=device) * 2 * stdv - stdv  # (n, D)
        self.bank = F.normalize(bank, dim=1)
        self.cluster_labels = torch.arange(num_samples, device=device).repeat(cfg.num_kmeans, 1)  # (m, n)

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """IR for the first ``ir_epochs``; from then on, every ``kmeans_every`` epochs, m k-means runs on the
        bank give C_i (rank 0's labels, broadcast) and LA takes over. ``features`` is not used: the clusters
        are of the bank."""
        cfg = self.cfg
        if epoch < cfg.ir_epochs or (epoch - cfg.ir_epochs) % cfg.kmeans_every:
            return
        labels = cluster_bank(self.bank, cfg.num_kmeans, cfg.kmeans_k, cfg.kmeans_iterations)  # (m, n)
        if _world()[0] > 1:
            dist.broadcast(labels, src=0)
        self.cluster_labels = labels
        self.aggregating.fill_(True)
        self._aggregating = True

    def forward(self, batch: dict) -> dict:
        if self.bank.shape[0] == 0:
            raise RuntimeError("LocalAggregation: call setup(num_samples, num_classes) to allocate the memory bank first")
        if self._aggregating is None:
            self._aggregating = bool(self.aggregating)
        cfg = self.cfg
        x, index = batch["views"][0], batch["index"]  # (N, C, H, W), (N,)
        v = F.normalize(self.projector(self.backbone(x)), dim=1)  # (N, D)
        with torch.autocast(x.device.type, enabled=False):  # scores and the loss in float32
            v = v.float()
            # a copy: the product keeps its operand for the backward pass, and the bank is updated in place
            sim = v @ self.bank.clone().T  # (N, n)
            if self._aggregating:
                back_sim, back_idx = background_neighbours(sim, min(cfg.background_k, sim.shape[1]))  # (N, k)
                close = close_neighbours(self.cluster_labels, index, back_idx)  # (N, k)
                loss = local_aggregation_loss(back_sim, close, cfg.temperature)  # Eq. 3
                close_frac = close.float().mean()
            else:
                loss = instance_recognition_loss(sim, index, cfg.temperature)  # the IR warm start
                close_frac = torch.zeros((), device=v.device)
        with torch.no_grad():
            own = sim.gather(1, index[:, None]).mean()  # cosine of v_i with its own bank entry
        # after the loss, without gradient, with the global batch so that every rank's bank stays the same
        update_bank(self.bank, concat_all_gather(index), concat_all_gather(v.detach()), cfg.bank_momentum)
        return {"loss": loss, "close_frac": close_frac, "pos_sim": own}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (the harness's k-NN and probes; the paper's k-NN uses the bank)."""
        return self.backbone(x)


MODEL = LocalAggregation


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(4, 6, generator=g) * 2 - 1
    close = torch.rand(4, 6, generator=g) < 0.5
    print("LA:", local_aggregation_loss(sim, close, 0.07).item(), "C = B:", local_aggregation_loss(sim, close | True, 0.07).item())
