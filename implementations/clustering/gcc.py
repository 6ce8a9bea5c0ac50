"""GCC — Zhong, Wu, Chen, Huang, Deng, Nie, Lin, Hua. "Graph Contrastive Clustering". ICCV 2021,
arXiv:2104.01429. Catalog id: ``gcc``.
Official code: https://github.com/mynameischaos/GCC (``end2end.py``, ``losses/losses.py`` RGCLoss and
AGCLoss, ``utils/train_utils.py`` gcc_train, ``utils/memory.py`` mine_nearest_neighbors and
laplace_transform, ``data/custom_dataset.py`` End2EndDataset, ``configs/end2end/end2end_cifar10.yml``).

A shared backbone f carries two heads: the representation head (Linear-ReLU-Linear to 128-d, L2-normalised)
gives z, the assignment head (one Linear to K logits, softmax) gives q. Two views x, x' of each image.

The graph. Every few epochs a K-nearest-neighbour list of every training image (K = 5, by inner product of
the normalised z of the whole training set; the image itself comes first, the list has K + 1 entries) is
built. The graph is symmetrised: the neighbourhood N(j) of image j holds its own list and every image that
lists j. Each image gets the weight w_j = sqrt(c / |N(j)|), c = 3 (official ``laplace_transform``): a
D^{-1/2} degree normalisation, so that a hub's pull is damped, as in the normalised graph Laplacian.

Representation graph contrast (RGC, official ``RGCLoss``). For anchor i (unit z_i of its first view) the
positives are its second view z'_i and the first R = 3 entries n_1(i), n_2(i), n_3(i) of its list (itself,
then its two nearest neighbours), each as its embedding b scaled by its weight; the negatives are everything
else of the (global) batch: the first views of all images (i included, as in the official code), the other
images' second views and the other images' neighbours,

    L_RGC = -1/N sum_i log [ (e^{z_i.z'_i / tau} + sum_r w_{n_r(i)} e^{w_{n_r(i)} z_i.b_{n_r(i)} / tau})
                             / (sum_j e^{z_i.z_j / tau} + sum_{j != i} e^{z_i.z'_j / tau}
                                + sum_r sum_{j != i} e^{w_{n_r(j)} z_i.b_{n_r(j)} / tau}) ],      tau = 0.1.

The positives are not in the denominator once the graph exists (a "decoupled" ratio, so L_RGC can be
negative). Before the first graph (the pretext epochs) it is the instance contrast
-1/N sum_i log e^{z_i.z'_i / tau} / (sum_j e^{z_i.z_j / tau} + sum_j e^{z_i.z'_j / tau}).

Assignment graph contrast (AGC, official ``AGCLoss``). Q (N x K) holds the first views' assignments, Q' the
assignments of one neighbour of each image, drawn uniformly from its K + 1 list (official ``np.random.choice
(indices[index])``). With q_k, q'_k the k-th COLUMNS (what the batch puts in cluster k), a cluster is its
own positive across the graph and the other clusters are negatives,

    L_AGC = -1/K sum_k log e^{cos(q_k, q'_k) / tau_A} / sum_l e^{cos(q_k, q'_l) / tau_A},     tau_A = 1,
    L_CR  = log K - H(o),  o_k = sum_i Q_ik / sum_ik Q_ik   (official ``loss_ne``, >= 0, 0 when uniform),
    L     = 2 L_RGC + L_AGC + 2 L_CR      (official gcc_train ``2.0 * constrastive_loss + cluster_loss`` and
                                            ``entropy_weight: 2.0``).

The cluster of an image is the argmax of its assignment (official ``get_predictions``). The paper's text
could not be retrieved while this file was written: the equations above are read off the official code,
and the paper's equation numbers and its lambda, eta weighting (L_RGC + lambda L_AGC + eta L_CR) are not
cited; the code's weights are the ones used.

Schedule (official ``end2end.py``): epochs 0..50 train the instance contrast alone; at the end of epoch 50
and every 5 epochs after it the graph is rebuilt, and from epoch 51 all three terms train.

Collapse: in both contrasts the other images (and their neighbours) are negatives, so a constant z pays
about log of the number of negatives. A constant assignment makes every column a multiple of the all-ones
vector, all columns alike, and L_AGC = log K; the entropy term L_CR penalises uneven cluster sizes, with
its maximum log K when every image falls into one cluster.

Distributed: the contrasts are over the global batch. Each rank's z, z' and Q are all-gathered with
gradient (``gather_with_grad``); each rank scores its own anchors in L_RGC against the gathered keys (the
rank mean of the loss is the one-process mean), while L_AGC and L_CR need the whole global assignment
matrix and are the same on every rank (the gather's backward sums each slice's gradient over the ranks,
DDP averages: the one-process gradient). The indices of the batch are gathered too, so that every rank
looks up the same neighbours and draws the same AGC neighbours (a generator seeded by the step count). The
graph and the bank are buffers, built from ``features`` on every rank and broadcast from rank 0; the bank
is written with the gathered batch, so it stays identical on every rank.

Deviations:
- neighbours come from a bank, not the network: the official data set loads the images of each sample's
  three list entries and of the AGC neighbour, augments them and passes them through the network with
  gradient (four extra forward passes per batch). The harness's batch holds the sampled indices only, and
  neighbours are rarely in the same batch (256 of 50,000), so the file keeps a bank (buffers, N x 128 and
  N x K) of each image's latest second-view z and assignment, written every step with no gradient; the
  neighbour terms use it (a neighbour's entries carry no gradient, the anchor's do). At every graph build
  the whole bank is refilled from the same pass that gives the graph's features;
- the graph's features: z of the evaluation transform of the current network (``features(encode)``); the
  official code uses the mean of each image's last 4 augmented second-view z (``AugFeat``, size 4);
- the k-NN search is an exact batched top-k on the device (official: faiss ``IndexFlatIP``, also exact);
- during the pretext epochs the assignment head enters the loss with weight 0, so that DDP (no
  ``find_unused_parameters``) sees every parameter used: its gradient is 0 and only weight decay moves it
  (official: untouched until epoch 51);
- the harness's cosine schedule to 0 (official: per epoch to 1e-3 of the peak); one assignment head
  (official ``nheads: 1``); the marginals' log is clamped at 1e-30 so that an empty cluster gives 0, not NaN;
- images stay at the data set's size; the STL-10 switch of training split at epoch 50 is not reproduced.
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
    proj_dim: int = 128
    """Width of the representation head's output z (official ``features_dim: 128``)."""
    proj_hidden_dim: int = 0
    """Hidden width of the representation head, Linear-ReLU-Linear without BN; 0 for the backbone's width, as
    the official ``End2EndModel`` (``backbone_dim`` -> ``backbone_dim`` -> 128)."""
    num_clusters: int = 0
    """K, the assignment head's width; 0 for the data set's number of classes, told by ``setup`` (official
    ``nclusters`` = ``num_classes``: 10 for CIFAR-10, 20 for CIFAR-100-20, 200 for Tiny-ImageNet). Before
    ``setup`` the head has 10."""
    temperature: float = 0.1
    """tau of L_RGC (official ``criterion_kwargs.temperature: 0.1``, every end2end config)."""
    agc_temperature: float = 1.0
    """tau_A of L_AGC (official ``AGCLoss.temperature = 1.0``, which the code never divides by: 1)."""
    rgc_weight: float = 2.0
    """Weight of L_RGC (official gcc_train: ``loss = 2.0 * constrastive_loss + cluster_loss``)."""
    agc_weight: float = 1.0
    """Weight of L_AGC + entropy_weight L_CR (official: ``cluster_loss`` unweighted)."""
    entropy_weight: float = 2.0
    """Weight of L_CR = log K - H(o) inside the cluster loss (official ``entropy_weight: 2.0``)."""
    num_neighbors: int = 5
    """K of the k-NN graph: each list has K + 1 entries, the image itself first (official end2end.py
    ``topk = 5``, searched for ``topk + 1``; configs ``num_neighbors: 5``)."""
    rgc_neighbors: int = 3
    """R, the list entries that are L_RGC positives: the first three, i.e. the image itself and its two
    nearest neighbours (official End2EndDataset ``neighbor_top1..3`` = ``indices[index][0..2]``)."""
    laplace_scale: float = 3.0
    """c of the degree weight w_j = sqrt(c / |N(j)|) (official ``laplace_transform``: ``sqrt(3.0 / len)``)."""
    pretext_epochs: int = 51
    """Epochs of instance contrast alone before the first graph (official end2end.py: ``epoch <= 50``)."""
    graph_interval: int = 5
    """The graph (and the bank) is rebuilt every this many epochs after the pretext epochs (official:
    ``epoch >= 50 and epoch % 5 == 0``, at the end of the epoch)."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official ``random_resized_crop.scale: [0.2, 1.0]``)."""
    optimizer: str = "sgd"
    """SGD, no Nesterov (official ``optimizer: sgd``, ``nesterov: False``)."""
    base_lr: float = 0.4
    """Official ``lr: 0.4`` at ``batch_size: 256`` (CIFAR-10/20), i.e. 0.4 per 256 images."""
    weight_decay: float = 1e-4
    """Official ``weight_decay: 0.0001``, on every parameter (``param_groups``)."""
    momentum: float = 0.9
    """Official ``momentum: 0.9``."""
    warmup_epochs: int = 0
    """No warm-up (official ``adjust_learning_rate``, cosine from the first epoch)."""
    epochs: int = 1000
    """Official ``epochs: 1000``, from scratch."""
    batch_size: int = 256
    """Official ``batch_size: 256`` (CIFAR-10/20; 96 for STL-10 and ImageNet-10)."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn, 256-d):
# - pretext_epochs 3, graph_interval 1: the official 51 of 1000 epochs (5%) and a rebuild every 5 epochs would
#   leave no graph in 15 epochs; 3 epochs of instance contrast, then a graph at the start of every epoch;
# - min_scale 0.4: a 20% crop of an 8x8 digit upscaled to 32 px is a blob (as SimCLR's and CC's presets);
# - optimizer lars, base_lr 0.3 (SimCLR's): with the paper's SGD at 0.4 per 256 (0.1 at batch 64) the k-NN
#   falls below the random-init one, 0.789 against 0.839 (assign NMI 0.42 against 0.07); with --set, SGD at
#   base_lr 1.6 gave 0.775, at 0.8 0.711, pretext_epochs 8 0.758, and pretext_epochs 15 (the instance contrast
#   alone, no graph) 0.775, so the graph terms were not what fell short. LARS at 0.3 gave 0.872 (assign NMI 0.22);
# - the rest is the paper's: K = 5, tau 0.1, the weights 2 / 1 / 2, weight decay 1e-4.
PRESETS = {"small": dict(pretext_epochs=3, graph_interval=1, min_scale=0.4, optimizer="lars", base_lr=0.3)}


# --- augmentations (official configs ``augmentation_strategy: simclr``, utils/common_config.py) ---------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from the same pipeline: random resized crop (scale min_scale..1), flip, colour jitter (0.4,
    0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2 (official ``get_train_transformations``, ``simclr``; the anchor,
    its augmentation and the neighbours all use it). Each takes a PIL image or a uint8 tensor."""
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads (official models/models.py End2EndModel) ------------------------------------------------


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-ReLU-Linear, no BN (official ``contrastive_head``, ``head: mlp``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


# --- the graph (official utils/memory.py) ------------------------------------------------------------


@torch.no_grad()
def knn_graph(z: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """(N, k + 1) indices of the k + 1 largest inner products of each row of z (N, D) with all rows, the row
    itself included (first, for unit rows without duplicates), in decreasing order; exact, in chunks of rows
    so that the (chunk, N) score matrix stays bounded (official ``mine_nearest_neighbors``, faiss IndexFlatIP)."""
    return torch.cat([(z[s : s + chunk] @ z.T).topk(k + 1, dim=1).indices for s in range(0, len(z), chunk)])


@torch.no_grad()
def degree_weights(neighbors: torch.Tensor, scale: float) -> torch.Tensor:
    """(N,) w_j = sqrt(scale / |N(j)|), N(j) = j's own list united with the images whose list holds j
    (official ``laplace_transform``). neighbors: (N, k + 1), distinct entries per row.
    |out u in| = |out| + |in| - |out n in|, the last counting the entries of j's list that list j back."""
    n, width = neighbors.shape
    in_degree = torch.bincount(neighbors.flatten(), minlength=n)  # (N,)
    rows = torch.arange(n, device=neighbors.device)
    mutual = (neighbors[neighbors] == rows[:, None, None]).any(dim=2).sum(dim=1)  # (N,): j -> m and m -> j
    return (scale / (width + in_degree - mutual).float()).sqrt()


# --- distributed helpers --------------------------------------------------------------------------


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


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# --- losses (official losses/losses.py) ---------------------------------------------------------------


def rgc_loss(z1: torch.Tensor, z2: torch.Tensor, neighbors: torch.Tensor | None, weights: torch.Tensor | None,
             temperature: float) -> torch.Tensor:
    """L_RGC for this rank's anchors (official ``RGCLoss``). z1, z2: (n, D) unit z of the two views;
    neighbors: (R, N, D) bank embeddings b of the R list entries of every image of the global batch of N
    (no gradient), weights: (R, N) their degree weights w; None for the pretext instance contrast. The keys
    are the global batch's blocks [z, z', w b_1, ..., w b_R], (B N, D) with B = 2 + R."""
    n = z1.shape[0]
    all1, offset = gather_with_grad(z1)  # (N, D)
    all2, _ = gather_with_grad(z2)
    n_global = all1.shape[0]
    blocks = [all1, all2]
    if neighbors is not None:
        blocks += list(weights.unsqueeze(-1) * neighbors)  # w_{n_r(j)} b_{n_r(j)}, R x (N, D)
    logits = z1 @ torch.cat(blocks).T / temperature  # (n, B N)
    rows = torch.arange(n, device=z1.device)
    own = rows + offset  # each anchor's column inside a block
    if neighbors is None:  # the positive z'_i against all 2N keys, itself included
        return (torch.logsumexp(logits, dim=1) - logits[rows, n_global + own]).mean()
    num_blocks = len(blocks)
    pos_cols = own[:, None] + n_global * torch.arange(1, num_blocks, device=z1.device)  # (n, 1 + R)
    log_w = torch.cat([torch.zeros_like(weights[:1]), weights.log()])[:, own].T  # (n, 1 + R): 1 for z'_i
    positive = torch.logsumexp(logits.gather(1, pos_cols) + log_w, dim=1)  # (n,)
    negative = torch.logsumexp(logits.scatter(1, pos_cols, float("-inf")), dim=1)  # (n,): the rest
    return (negative - positive).mean()


def agc_loss(q: torch.Tensor, q_neighbor: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_AGC, L_CR) of the assignments q (N, K) of the first views and q_neighbor (N, K) of one neighbour of
    each image, rows on the simplex (official ``AGCLoss``: ``loss_ce``, ``loss_ne``)."""
    k = q.shape[1]
    sim = F.normalize(q.T, dim=1) @ F.normalize(q_neighbor.T, dim=1).T  # (K, K): cos(q_k, q'_l)
    l_agc = F.cross_entropy(sim / temperature, torch.arange(k, device=q.device))  # cluster k <-> k
    o = q.sum(dim=0)  # (K,)
    o = o / o.sum()
    l_cr = math.log(k) + (o * o.clamp_min(1e-30).log()).sum()  # log K - H(o)
    return l_agc, l_cr


# --- model ----------------------------------------------------------------------------------------


class GCC(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if not 1 <= cfg.rgc_neighbors <= cfg.num_neighbors + 1:
            raise ValueError(f"rgc_neighbors {cfg.rgc_neighbors} must be in 1..num_neighbors + 1 = {cfg.num_neighbors + 1}")
        self.cfg = cfg
        self.backbone = backbone
        self.hidden_dim = cfg.proj_hidden_dim or feature_dim
        self.contrastive_head = mlp_head(feature_dim, self.hidden_dim, cfg.proj_dim)  # z
        self.cluster_head = nn.Linear(feature_dim, cfg.num_clusters or 10)  # q, logits
        # the graph and the bank, sized by setup: (N, K + 1) lists, (N,) weights, (N, D) z and (N, K) q
        self.register_buffer("neighbors", torch.zeros(0, cfg.num_neighbors + 1, dtype=torch.long))
        self.register_buffer("degree_weight", torch.zeros(0))
        self.register_buffer("bank_z", torch.zeros(0, cfg.proj_dim))
        self.register_buffer("bank_q", torch.zeros(0, self.num_clusters))
        self.register_buffer("graph_built", torch.zeros((), dtype=torch.bool))
        self.draws = 0  # forward passes so far: seeds the AGC neighbour draw alike on every rank

    @property
    def num_clusters(self) -> int:
        return self.cluster_head.out_features

    def setup(self, num_samples: int, num_classes: int) -> None:
        """K = the data set's number of classes unless the Config sets it (the head is rebuilt when its width
        differs); room for the graph and the bank of every training image (no graph yet)."""
        k = self.cfg.num_clusters or num_classes
        if k < 2:
            raise ValueError(f"GCC needs at least 2 clusters, got K = {k}")
        if num_samples <= self.cfg.num_neighbors:
            raise ValueError(f"num_neighbors {self.cfg.num_neighbors} needs more than {num_samples} training images")
        device = self.bank_z.device
        if k != self.num_clusters:
            self.cluster_head = nn.Linear(self.cluster_head.in_features, k).to(device)
        self.neighbors = torch.zeros(num_samples, self.cfg.num_neighbors + 1, dtype=torch.long, device=device)
        self.degree_weight = torch.ones(num_samples, device=device)
        self.bank_z = torch.zeros(num_samples, self.cfg.proj_dim, device=device)
        self.bank_q = torch.full((num_samples, k), 1.0 / k, device=device)
        self.graph_built.fill_(False)

    def param_groups(self) -> list[dict]:
        """One group, weight decay on every parameter (official ``get_optimizer``: ``model.parameters()``)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": self.cfg.weight_decay}]

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit z (n, proj_dim), assignments q (n, K)) of images x, in float32."""
        h = self.backbone(x)  # (n, D)
        z = F.normalize(self.contrastive_head(h).float(), dim=1)
        return z, torch.softmax(self.cluster_head(h).float(), dim=1)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        if self.bank_z.shape[0] == 0:
            raise RuntimeError("GCC has no bank yet: setup(num_samples, num_classes) must run before the first step")
        x1, x2 = batch["views"][:2]  # (n, C, H, W) each
        n = x1.shape[0]
        z, q = self.heads(torch.cat([x1, x2]))  # one backbone call for both views, as official
        z1, z2 = z.split(n)  # (n, proj_dim) each
        q1, q2 = q.split(n)  # (n, K) each
        index = concat_all_gather(batch["index"])  # (N,) the global batch
        out = {}
        if bool(self.graph_built):
            lists = self.neighbors[index]  # (N, K + 1)
            entries = lists[:, : cfg.rgc_neighbors].T  # (R, N): the RGC positives n_r(j)
            l_rgc = rgc_loss(z1, z2, self.bank_z[entries], self.degree_weight[entries], cfg.temperature)
            g = torch.Generator().manual_seed(self.draws)
            pick = torch.randint(lists.shape[1], (lists.shape[0],), generator=g).to(lists.device)  # (N,)
            q_neighbor = self.bank_q[lists.gather(1, pick[:, None]).squeeze(1)]  # (N, K), no gradient
            q_all, _ = gather_with_grad(q1)  # (N, K)
            l_agc, l_cr = agc_loss(q_all, q_neighbor, cfg.agc_temperature)
            cluster = l_agc + cfg.entropy_weight * l_cr
            out.update(agc_loss=l_agc.detach(), entropy_gap=l_cr.detach())
        else:  # pretext epochs: instance contrast alone; the head joins with weight 0 (DDP sees it used)
            l_rgc = rgc_loss(z1, z2, None, None, cfg.temperature)
            cluster = 0.0 * q1.sum()
        self.draws += 1
        with torch.no_grad():  # each image's latest second view, written by every rank for the global batch
            self.bank_z.index_copy_(0, index, concat_all_gather(z2.detach()))
            self.bank_q.index_copy_(0, index, concat_all_gather(q2.detach()))
            used = q1.argmax(dim=1).unique().numel() / self.num_clusters
        loss = cfg.rgc_weight * l_rgc + cfg.agc_weight * cluster
        return {"loss": loss, "rgc_loss": l_rgc.detach(), "used_clusters": torch.tensor(used), **out}

    @torch.no_grad()
    def build_graph(self, z: torch.Tensor, q: torch.Tensor) -> None:
        """The k-NN graph and its weights from z (N, proj_dim) of the whole training set, and the bank refilled
        with z (normalised) and q (N, K); rank 0's on every rank."""
        device = self.bank_z.device
        z = F.normalize(z.to(device).float(), dim=1)
        q = q.to(device).float()
        neighbors = knn_graph(z, self.cfg.num_neighbors)  # (N, K + 1)
        weights = degree_weights(neighbors, self.cfg.laplace_scale)  # (N,)
        if _world()[0] > 1:  # one graph for all ranks
            for t in (neighbors, weights, z, q):
                dist.broadcast(t, src=0)
        self.neighbors.copy_(neighbors)
        self.degree_weight.copy_(weights)
        self.bank_z.copy_(z)
        self.bank_q.copy_(q)
        self.graph_built.fill_(True)

    def graph_due(self, epoch: int) -> bool:
        """Whether the graph is rebuilt at the start of ``epoch`` (after the pretext epochs, every interval)."""
        cfg = self.cfg
        return epoch >= cfg.pretext_epochs and (epoch - cfg.pretext_epochs) % cfg.graph_interval == 0

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """At the scheduled epochs: z and q of the whole training set (evaluation transform), then the graph
        and the bank (``build_graph``)."""
        if not self.graph_due(epoch):
            return
        d = self.cfg.proj_dim
        zq = features(lambda x: torch.cat(self.heads(x), dim=1))  # (N, proj_dim + K)
        self.build_graph(zq[:, :d], zq[:, d:])

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features, before both heads."""
        return self.backbone(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The cluster of each image, (N,) in [0, K): the argmax of the assignment head."""
        return self.cluster_head(self.backbone(x)).argmax(dim=1)


MODEL = GCC


if __name__ == "__main__":
    z = F.normalize(torch.randn(8, 4), dim=1)
    nbrs = knn_graph(z, 2)
    print("3-NN lists (itself first):", nbrs.tolist())
    print("degree weights:", degree_weights(nbrs, 3.0).tolist())
