"""SCAN — Van Gansbeke, Vandenhende, Georgoulis, Proesmans, Van Gool. "SCAN: Learning to Classify Images
without Labels". ECCV 2020, arXiv:2005.12320. Catalog id: ``scan``.
Official code: https://github.com/wvangansbeke/Unsupervised-Classification (``simclr.py``, ``scan.py``,
``selflabel.py``, ``losses/losses.py``, ``configs/``).

Three stages in one run (Sec. 2), switched at epoch boundaries:

1. Pretext (Sec. 2.1): SimCLR, NT-Xent over two augmented views with temperature t,

       l(i, j) = -log exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t),

   z the l2-normalised output of an MLP head on the backbone features.
2. Mining and clustering (Sec. 2.2): the K nearest neighbours N_X of every image X in the pretext space
   (cosine similarity of z over the whole training set) are mined once; cluster heads Phi (softmax over C
   clusters) then minimise (Eq. 2)

       Lambda = -1/|D| sum_{X in D} sum_{k in N_X} log <Phi(X), Phi(k)>  +  lambda sum_c Phi'^c log Phi'^c,
       Phi'^c = 1/|D| sum_{X in D} Phi^c(X),

   the first term asking an image and its neighbours for the same confident prediction, the second
   (the negative entropy of the mean prediction over the batch, lambda = 5) spreading the images over the
   clusters. Several heads are trained at once; the one with the lowest SCAN loss over the training set
   (official ``scan_evaluate``: consistency minus entropy) is kept.
3. Self-labelling (Sec. 2.3): with the kept head, images whose weakly augmented view is predicted with a
   confidence above a threshold (0.99) take that argmax as their label; the strongly augmented view is
   trained on it with the cross-entropy, each label weighted by the inverse of its frequency among the
   confident images (official ``ConfidenceBasedCE``, ``apply_class_balancing``).

Collapse: in the pretext stage, the negatives of NT-Xent (a constant embedding has its largest loss). In
the clustering stage, one cluster for all images makes the consistency term 0 but the entropy term
lambda * 0 = its maximum, while the uniform mean prediction gives -lambda log C, its minimum; a uniform
prediction per image is ruled out by the consistency term, whose minimum asks for confident (one-hot)
and agreeing predictions. Self-labelling trains only on confident images, class-balanced.

Distributed: NT-Xent gathers the projections with gradient (each rank scores its anchors against the
global batch); the mean prediction Phi' of the entropy term is over the global batch (anchor
probabilities gathered with gradient, whose backward sums every rank's copy of the loss); the bank of
predictions is written with the global batch's indices and distributions; the self-labelling class
frequencies and the loss's normaliser are all-reduced. The mined neighbours and the bank set at an epoch
start are broadcast from rank 0, so every rank holds the same state.

Deviations:
- the neighbour problem: a batch holds the sampled images only, so a neighbour's image is not at hand
  (the official loader returns one random neighbour's augmented image with each anchor and passes both
  through the network). A bank (N, heads, C) keeps each image's latest predicted distribution: filled
  at the mining step from a pass of the whole training set through the heads (evaluation transform),
  refreshed the same way at every later clustering epoch (that pass also ranks the heads), and overwritten
  by each batch's anchors (gathered across ranks). The consistency term uses the stored distributions
  of the mined neighbours without gradient, so the gradient flows through the anchor only;
- all K neighbours enter each anchor's term as their mean (the official loader draws one of them at
  random per step, whose expectation this is; Eq. 2 writes the sum, a factor K that lambda = 5 of the
  official code does not carry). The neighbours exclude the anchor itself (Eq. 2's N_X; the official
  mining keeps the anchor among its K + 1 candidates);
- one optimizer and the harness's schedule for the whole run: SGD with momentum and the pretext's
  rate and decay (official ``simclr_cifar10.yml``), cosine over all stages. The official clustering and
  self-labelling stages use Adam (lr 1e-4, weight decay 1e-4, constant) and batches of 128 and 1000;
  a preset can rescale the later stages' gradient (``scan_lr_scale``, ``selflabel_lr_scale``), which
  with SGD scales their step as a rate would;
- modules that a stage does not train (the heads in the pretext stage, the projection head later, the
  other heads during self-labelling) enter the loss with weight 0 so that every parameter gets a
  gradient (DDP without ``find_unused_parameters``). The heads are drawn afresh at the mining step (as
  the official clustering model's new heads) from a fixed seed, alike on every rank; the official
  code also restores the lowest-loss epoch's weights, which here go on training;
- strong augmentation: the paper's RandAugment (4 random ops) and Cutout cannot run batched on the
  device, so the strong view is the SimCLR recipe plus solarisation, and Cutout (one square of up to half
  the side, zeroed after normalisation, official ``Cutout(n_holes=1, length=16, random=True)`` at 32 px) is
  applied to the strong view inside ``forward`` from the global RNG. The weak view of self-labelling is the
  image as it is (official: the validation transform, a centre crop of the full size);
- the epochs of the three stages are those of ``Config`` when they sum to the run's epochs; otherwise they
  are scaled to the run's length.
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
    temperature: float = 0.1
    """NT-Xent temperature t (official ``configs/pretext/simclr_cifar10.yml``: ``temperature: 0.1``)."""
    proj_hidden_dim: int = 512
    """Hidden width of the pretext MLP head (official ``ContrastiveModel``: the backbone width, 512 for ResNet-18)."""
    proj_dim: int = 128
    """Output dimension of the pretext head (official ``features_dim: 128``)."""
    num_neighbors: int = 20
    """K, mined neighbours per image (Sec. 3.1; official ``num_neighbors: 20``, ``topk = 20`` in simclr.py)."""
    num_clusters: int = 10
    """C, clusters per head: the number of classes (official ``num_classes: 10`` for CIFAR-10)."""
    num_heads: int = 1
    """Cluster heads trained at once, the lowest-loss one kept (official ``scan_cifar10.yml``: 1; the
    ImageNet configs: 10)."""
    entropy_weight: float = 5.0
    """lambda, the weight of the entropy term (Sec. 3.1; official ``entropy_weight: 5.0``)."""
    confidence_threshold: float = 0.99
    """Self-labelling confidence threshold (Sec. 3.1; official ``confidence_threshold: 0.99``)."""
    class_balancing: bool = True
    """Weight the self-labelling cross-entropy by inverse label frequency (official ``selflabel_cifar10.yml``
    ``apply_class_balancing: True``; the ImageNet configs turn it off)."""
    scan_strong_view: bool = True
    """Clustering-stage anchors on the strong view (official CIFAR/STL configs: ``augmentation_strategy:
    ours``); False: the SimCLR view (the ImageNet configs)."""
    cutout_fraction: float = 0.5
    """Largest Cutout side over the image side (official ``length: 16`` at 32 px); 0 turns Cutout off."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official ``random_resized_crop: scale: [0.2, 1.0]``)."""
    pretext_epochs: int = 500
    """Epochs of the SimCLR stage (official ``simclr_cifar10.yml``: ``epochs: 500``)."""
    scan_epochs: int = 50
    """Epochs of the clustering stage (official ``scan_cifar10.yml``: ``epochs: 50``)."""
    selflabel_epochs: int = 200
    """Epochs of the self-labelling stage (official ``selflabel_cifar10.yml``: ``epochs: 200``)."""
    scan_lr_scale: float = 1.0
    """Factor on the clustering-stage loss (its step under SGD); 1 in the paper's setting (see Deviations)."""
    selflabel_lr_scale: float = 1.0
    """Factor on the self-labelling loss (its step under SGD); 1 in the paper's setting."""
    optimizer: str = "sgd"
    """SGD (official pretext ``optimizer: sgd``; see Deviations for the later stages' Adam)."""
    base_lr: float = 0.2
    """Official pretext ``lr: 0.4`` at ``batch_size: 512``, i.e. 0.2 per 256 images, cosine."""
    weight_decay: float = 1e-4
    """Official ``weight_decay: 0.0001`` (all three stages)."""
    momentum: float = 0.9
    """Official ``momentum: 0.9``."""
    warmup_epochs: int = 0
    """No warm-up (official ``scheduler: cosine``)."""
    epochs: int = 750
    """The three stages: 500 + 50 + 200."""
    batch_size: int = 512
    """Official pretext ``batch_size: 512`` (clustering 128, self-labelling 1000)."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - stages of 9 + 4 + 2 epochs (the official 500 + 50 + 200 have two thirds pretext; the pretext needs the
#   most steps here, and two epochs of self-labelling are enough for a fine-tuning step);
# - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as simclr's preset);
# - three heads: the lowest-loss one is kept, which guards a short run against one bad head;
# - proj_hidden_dim 256, the small_cnn width.
# Tried: with the harness's single SGD the clustering stage stays at the saddle of uniform predictions
# (consistency ~ log C = 2.29 of 2.30 over its 88 steps, no image above 0.99 in self-labelling);
# scan_lr_scale 20 and 100 on the pretrained backbone (60 steps) did not leave it either. The official
# clustering stage uses Adam, whose normalised steps leave it; the harness has one optimizer per run.
PRESETS = {"small": dict(pretext_epochs=9, scan_epochs=4, selflabel_epochs=2, epochs=15, min_scale=0.4,
                         num_heads=3, proj_hidden_dim=256)}


# --- augmentations (official ``get_train_transformations``: ``simclr`` and ``ours``) -----------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Four views, all made every step: two SimCLR views (crop, flip, colour jitter p=0.8, grayscale p=0.2,
    official ``simclr`` strategy) for the pretext stage, the weak view (the image as it is) and the strong
    view (the SimCLR recipe plus solarisation p=0.2; Cutout is added in ``forward``) for the clustering and
    self-labelling stages. Each takes a PIL image or a uint8 tensor."""
    simclr = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    end = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    weak = [v2.ToImage(), *end]
    strong = [*simclr, v2.ToDtype(torch.float32, scale=True), v2.RandomSolarize(0.5, p=0.2), v2.Normalize(mean, std)]
    return [v2.Compose(simclr + end), v2.Compose(simclr + end), v2.Compose(weak), v2.Compose(strong)]


def cutout(x: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """One zeroed square per image of x (N, C, H, W), after normalisation (official ``Cutout``): half-side
    randint(1, L) // 2 with L = max_fraction * W, centre uniform over the image, clipped at the borders.
    Drawn from the global RNG on the CPU."""
    n, _, h, w = x.shape
    length = int(max_fraction * w)
    if length < 1:
        return x
    half = torch.randint(1, length + 1, (n,)) // 2  # (N,)
    cy, cx = torch.randint(0, h, (n,)), torch.randint(0, w, (n,))
    rows, cols = torch.arange(h)[None], torch.arange(w)[None]  # (1, H), (1, W)
    in_r = (rows >= (cy - half)[:, None]) & (rows < (cy + half)[:, None])  # (N, H)
    in_c = (cols >= (cx - half)[:, None]) & (cols < (cx + half)[:, None])  # (N, W)
    hole = (in_r[:, :, None] & in_c[:, None, :]).to(x.device)  # (N, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


# --- heads ----------------------------------------------------------------------------------------


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """The pretext MLP head: Linear, ReLU, Linear (official ``ContrastiveModel(head='mlp')``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


# --- distributed helpers (copied verbatim from simclr.py and swav.py) ------------------------------


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


# --- losses ---------------------------------------------------------------------------------------


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


ENTROPY_EPS = 1e-8  # official losses.py EPS: probabilities clamped before x log x


def _full(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (half-precision logits under autocast; float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def scan_loss(anchor_logits: torch.Tensor, neighbor_probs: torch.Tensor, entropy_weight: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 2 for one head: (total, consistency, entropy). anchor_logits (N, C) of this rank's anchors;
    neighbor_probs (N, K, C) the distributions of their K neighbours (constants). Consistency: the mean
    over anchors and neighbours of -log <Phi(X), Phi(k)> (log clamped at -100 as ``nn.BCELoss``);
    entropy: H(Phi') of the mean prediction over the global batch; total = consistency - lambda H."""
    p = F.softmax(_full(anchor_logits), dim=1)  # (N, C)
    dots = torch.einsum("nc,nkc->nk", p, neighbor_probs.to(p.dtype))  # (N, K): <Phi(X), Phi(k)>
    consistency = -dots.log().clamp_min(-100.0).mean()
    p_all, _ = gather_with_grad(p)  # (N_global, C): Phi' over the global batch
    mean = p_all.mean(dim=0).clamp_min(ENTROPY_EPS)  # (C,)
    entropy = -(mean * mean.log()).sum()
    return consistency - entropy_weight * entropy, consistency, entropy  # Eq. 2: + lambda sum Phi' log Phi'


def selflabel_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float,
                   class_balancing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 2.3, official ``ConfidenceBasedCE``: (loss, number of confident images over the global batch).
    weak_logits, strong_logits (N, C). Images whose weak softmax exceeds ``threshold`` take its argmax y;
    the loss is sum_i w_{y_i} CE(strong_i, y_i) / sum_i w_{y_i} over them, w_c = n / n_c (n confident
    images, n_c with label c; 1 without balancing). Counts and the normaliser are over the global batch;
    each rank's loss is scaled by the world size, so that DDP's averaging gives the global loss."""
    world, _ = _world()
    prob = F.softmax(_full(weak_logits.detach()), dim=1)  # (N, C), no gradient: the targets
    conf, target = prob.max(dim=1)  # (N,), (N,)
    mask = (conf > threshold).to(prob.dtype)  # (N,)
    counts = torch.zeros_like(prob[0]).index_add_(0, target, mask)  # (C,)
    if world > 1:
        dist.all_reduce(counts)
    n = counts.sum()
    if class_balancing:
        weight = torch.where(counts > 0, n / counts.clamp_min(1), torch.ones_like(counts))  # (C,): 1/freq
    else:
        weight = torch.ones_like(counts)
    w = weight[target] * mask  # (N,)
    ce = F.cross_entropy(_full(strong_logits), target, reduction="none")  # (N,)
    den = w.sum()
    if world > 1:
        dist.all_reduce(den)
    loss = world * (w * ce).sum() / den.clamp_min(1e-12)  # 0 (with a graph) when no image is confident
    return loss, n


# --- mining and head selection --------------------------------------------------------------------


@torch.no_grad()
def mine_neighbors(z: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """(N, k) indices of the k nearest neighbours of every row of z (N, D) by cosine similarity, the row
    itself excluded; rows in chunks so that the (chunk, N) similarities stay bounded."""
    n = len(z)
    if not 1 <= k < n:
        raise ValueError(f"{k} neighbours of each of {n} images: k must be between 1 and {n - 1}")
    z = F.normalize(z.float(), dim=1)
    out = []
    for i in range(0, n, chunk):
        sim = z[i : i + chunk] @ z.T  # (chunk, N)
        rows = torch.arange(len(sim), device=z.device)
        sim[rows, rows + i] = float("-inf")  # not its own neighbour
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


@torch.no_grad()
def head_losses(probs: torch.Tensor, neighbors: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(H,) SCAN loss of every head over the whole set, as the official ``scan_evaluate``: consistency
    -log <Phi(X), Phi(k)> averaged over images and neighbours, minus the entropy of the mean prediction
    (weight 1). probs (N, H, C), neighbors (N, K)."""
    total = torch.zeros(probs.shape[1], dtype=torch.float64, device=probs.device)
    for i in range(0, len(probs), chunk):
        dots = torch.einsum("nhc,nkhc->nkh", probs[i : i + chunk], probs[neighbors[i : i + chunk]])  # (n, K, H)
        total += -dots.log().clamp_min(-100.0).double().sum(dim=(0, 1))
    consistency = total / neighbors.numel()
    mean = probs.double().mean(dim=0).clamp_min(ENTROPY_EPS)  # (H, C)
    return consistency + (mean * mean.log()).sum(dim=1)


def stage_bounds(cfg: Config, total_epochs: int) -> tuple[int, int]:
    """First epochs of the clustering and of the self-labelling stage; the Config's stage lengths, scaled
    to ``total_epochs`` when they do not sum to it."""
    lengths = (cfg.pretext_epochs, cfg.scan_epochs, cfg.selflabel_epochs)
    s = sum(lengths)
    if s == total_epochs:
        return lengths[0], lengths[0] + lengths[1]
    return round(total_epochs * lengths[0] / s), round(total_epochs * (lengths[0] + lengths[1]) / s)


PRETEXT, CLUSTER, SELFLABEL = 0, 1, 2


# --- model ----------------------------------------------------------------------------------------


class SCAN(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, cfg.num_clusters) for _ in range(cfg.num_heads))
        self.register_buffer("stage", torch.tensor(PRETEXT))
        self.register_buffer("best_head", torch.tensor(0))
        self.register_buffer("mined", torch.tensor(False))
        self.register_buffer("neighbors", torch.zeros(0, cfg.num_neighbors, dtype=torch.long))  # (N, K), set by setup
        self.register_buffer("bank", torch.zeros(0, cfg.num_heads, cfg.num_clusters))  # (N, H, C) predictions
        self._stage: int | None = None  # the stage as a Python int, so that a step does not read the device

    def setup(self, num_samples: int, num_classes: int) -> None:
        """Room for the neighbours and the prediction bank of every training image (uniform predictions
        until the mining step)."""
        cfg, device = self.cfg, self.bank.device
        if num_samples <= cfg.num_neighbors:
            raise ValueError(f"num_neighbors {cfg.num_neighbors} needs more than the {num_samples} training images")
        self.neighbors = torch.zeros(num_samples, cfg.num_neighbors, dtype=torch.long, device=device)
        self.bank = torch.full((num_samples, cfg.num_heads, cfg.num_clusters), 1.0 / cfg.num_clusters, device=device)

    # encoders for the whole-set passes of the epoch hook

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The pretext space, where neighbours are mined: (N, proj_dim), l2-normalised (official
        ``ContrastiveModel.forward``, filled into the memory bank that ``mine_nearest_neighbors`` searches)."""
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def head_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's cluster distribution, flattened: (N, H * C)."""
        h = self.backbone(x)  # (N, D)
        return torch.stack([F.softmax(head(h).float(), dim=1) for head in self.heads], dim=1).flatten(1)

    @torch.no_grad()
    def _init_heads(self, generator: torch.Generator) -> None:
        """nn.Linear's default init, U(-1/sqrt(D), 1/sqrt(D)) for weights and biases, drawn from
        ``generator`` so that every rank draws the same heads."""
        for head in self.heads:
            bound = 1.0 / math.sqrt(head.in_features)
            for p in (head.weight, head.bias):
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)

    @torch.no_grad()
    def _refresh_bank(self, features) -> None:
        """The bank from a pass of the whole training set through the heads; the lowest-loss head kept."""
        n = len(self.bank)
        probs = features(self.head_probs).to(self.bank.device).view(n, self.cfg.num_heads, self.cfg.num_clusters)
        if _world()[0] > 1:  # one bank for all ranks
            dist.broadcast(probs, src=0)
        self.bank.copy_(probs)
        self.best_head.fill_(int(head_losses(self.bank, self.neighbors).argmin()))

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """Set the stage. Entering the clustering stage: mine the K nearest neighbours of every image in
        the pretext space (``features(project)``), draw fresh heads, fill the bank. At every clustering
        epoch and at the first self-labelling epoch: refresh the bank and keep the lowest-loss head."""
        cfg = self.cfg
        if len(self.bank) == 0:
            raise RuntimeError("SCAN needs setup(num_samples, num_classes) before the epoch hook")
        first_cluster, first_selflabel = stage_bounds(cfg, total_epochs)
        stage = PRETEXT if epoch < first_cluster else CLUSTER if epoch < first_selflabel else SELFLABEL
        if stage >= CLUSTER and not bool(self.mined):
            nbrs = mine_neighbors(features(self.project).to(self.bank.device), cfg.num_neighbors)
            if _world()[0] > 1:  # one neighbour set for all ranks
                dist.broadcast(nbrs, src=0)
            self.neighbors.copy_(nbrs)
            self._init_heads(torch.Generator().manual_seed(0))
            self.mined.fill_(True)
            self._refresh_bank(features)
        elif stage == CLUSTER or (stage == SELFLABEL and int(self.stage) == CLUSTER):
            self._refresh_bank(features)
        self.stage.fill_(stage)
        self._stage = stage

    def _zero(self, *outputs: torch.Tensor) -> torch.Tensor:
        """0 with a gradient path to every output given (see Deviations: DDP needs every parameter used)."""
        return sum(0.0 * o.float().sum() for o in outputs)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        views, index = batch["views"], batch["index"]
        stage = self._stage if self._stage is not None else int(self.stage)
        if stage == PRETEXT:
            h1, h2 = self.backbone(views[0]), self.backbone(views[1])  # (N, D) each
            z1, z2 = self.projector(h1), self.projector(h2)  # (N, proj_dim)
            loss = nt_xent(z1, z2, cfg.temperature) + self._zero(*(head(h1) for head in self.heads))
            return {"loss": loss}
        if len(self.bank) == 0 or not bool(self.mined):
            raise RuntimeError("SCAN has no neighbours yet: setup() and on_epoch_start() (the mining) must run "
                               "before a clustering or self-labelling step")
        strong = cutout(views[3], cfg.cutout_fraction)  # (N, C, H, W)
        if stage == CLUSTER:
            h = self.backbone(strong if cfg.scan_strong_view else views[0])  # (N, D)
            logits = [head(h) for head in self.heads]  # H x (N, C)
            nbr = self.bank[self.neighbors[index]]  # (N, K, H, C), stored: no gradient
            parts = [scan_loss(s, nbr[:, :, j], cfg.entropy_weight) for j, s in enumerate(logits)]
            total = torch.stack([t for t, _, _ in parts]).sum()  # official: the heads' losses summed
            loss = cfg.scan_lr_scale * total + self._zero(self.projector(h))
            with torch.no_grad():  # the anchors' latest predictions into the bank, from every rank
                probs = torch.stack([F.softmax(s.float(), dim=1) for s in logits], dim=1)  # (N, H, C)
                self.bank.index_copy_(0, concat_all_gather(index), concat_all_gather(probs))
            b = int(self.best_head)
            return {"loss": loss, "consistency": parts[b][1].detach(), "entropy": parts[b][2].detach()}
        b = int(self.best_head)
        with torch.no_grad():
            weak_logits = self.heads[b](self.backbone(views[2]))  # (N, C): the targets
        h = self.backbone(strong)  # (N, D)
        loss, confident = selflabel_loss(weak_logits, self.heads[b](h), cfg.confidence_threshold, cfg.class_balancing)
        others = [head(h) for j, head in enumerate(self.heads) if j != b]
        loss = cfg.selflabel_lr_scale * loss + self._zero(self.projector(h), *others)
        return {"loss": loss, "confident": confident / (len(index) * _world()[0])}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features."""
        return self.backbone(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The kept head's cluster of each image, (N,)."""
        return self.heads[int(self.best_head)](self.backbone(x)).argmax(dim=1)


MODEL = SCAN


if __name__ == "__main__":
    z = F.normalize(torch.randn(100, 8), dim=1)
    print("neighbours of image 0:", mine_neighbors(z, 5)[0].tolist())
    onehot = torch.eye(4).repeat(5, 1)  # 20 images in 4 balanced, confident clusters
    print("SCAN loss, consistent and balanced:", scan_loss(onehot * 20, onehot[:, None].expand(20, 3, 4), 5.0)[0].item())
