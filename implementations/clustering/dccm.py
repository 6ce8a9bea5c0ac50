"""DCCM — Wu, Long, Wang, Qian, Li, Lin, Zha. "Deep Comprehensive Correlation Mining for Image
Clustering". ICCV 2019, arXiv:1904.06925. Catalog id: ``dccm``.
Official code: https://github.com/Cory-M/DCCM (``main.py``, ``utils/functions.py`` ``comp_simi``,
``utils/util.py`` ``WeightedBCE``, ``utils/sampling.py``, ``models/dim_Model.py``, ``models/cifar_C4_L2.py``,
``cfgs/cifar10.yaml``).

A network ends in a softmax over K clusters, p = f(x) (N, K), "ideally one-hot". Three correlations of
the unlabelled data, all mined from the confident predictions on the ORIGINAL images (no gradient) and
imposed on the predictions of TRANSFORMED copies x' (affine + colour perturbations), train it:

Pseudo-graph supervision. The cosine similarity of two predictions, S_ij = p_i . p_j / (|p_i| |p_j|),
thresholded gives a binary graph over the batch, W_ij = 1[S_ij >= s] (s = 0.95; the diagonal is 1). The
similarities S'_ij of the transformed copies are fitted to it with the binary cross-entropy over all
N^2 pairs (official ``crit_graph = nn.BCELoss()`` on ``comp_simi`` of the augmented batch):

    L_graph = 1/N^2 sum_ij  -[W_ij log S'_ij + (1 - W_ij) log(1 - S'_ij)].

Pseudo-label supervision and transformation consistency. An original whose largest probability reaches
t = 0.9 is confident; its argmax y_i is the pseudo-label (a K-partition, category information beyond
pairs) that the transformed copy must predict. With the official ``WeightedBCE`` (a binary
cross-entropy per class against the one-hot label, averaged over the K classes, eps 1e-12):

    L_label = 1/N sum_i 1[max_k p_ik >= t] 1/K sum_k -[y_ik log(p'_ik + eps) + (1 - y_ik) log(1 - p'_ik + eps)].

Triplet mutual information. Deep InfoMax's local objective between a shallow feature map M (N, C, L
locations) and the deep feature Y (N, K), the cluster head's last linear output before its BatchNorm
(official ``layers: [7, 19]``), both of the transformed copy, lifted from instances to triplets with the
pseudo-graph: for each anchor Y_i the positives are its own map M_i and the map of a graph neighbour
(W_ij = 1), the negatives the maps of two images the graph separates (W_ij = 0). A discriminator T
(concat-and-convolve: [M^(l); Y] through 1x1 convs 512-512-1 without biases, official
``LocalDiscriminator``) scores each pair at each location, and the Jensen-Shannon estimator is used (sp the
softplus, official ``DIM_Loss``):

    L_MI = -( E_P[-sp(-T(M_j^(l), Y_i))] - E_N[sp(T(M_k^(l), Y_i))] ).

The objective (official ``coeff``: graph 1, label 5, local 0.05):

    L = L_graph + 5 L_label + 0.05 L_MI.

The paper's own text (its equation numbers, and whether it states more than the official code does)
could not be read for this file; every value here is cited to the official code.

Collapse: the graph term pushes the predictions of every pair the graph separates towards orthogonal
(S'_ij -> 0, which for softmax outputs means different clusters), so a constant prediction, which makes
every S'_ij = 1, pays log(1/eps) on each separated pair; the MI negatives likewise need the features to
tell the anchor from images of other clusters. The targets take no gradient (the originals are
forwarded under ``no_grad``), and the thresholds keep only confident relations.

Views: view 0 is the original image (only normalised, as the official loader's ``ToTensor``), views
1..T are its transformed copies (official: two augmented draws of every small batch, ``sign > 1:
break``). The official transform is keras' ``ImageDataGenerator(rotation_range=20,
width_shift_range=0.18, height_shift_range=0.18, channel_shift_range=0.1, horizontal_flip=True,
rescale=0.95, zoom_range=[0.85, 1.15])``: the flip is in the view recipe (torchvision, batched by the
harness), the rest, which torchvision's batched ops do not cover, is DCCM's own transform made in
``forward`` from the normalised views (``keras_transform``, batched: one affine grid per image, nearest-edge
fill as keras' ``fill_mode='nearest'``, then a per-channel shift clipped to the image's range, then the
rescale), the normalisation undone first (``set_normalization``).

Distributed: every term is over the global batch. The originals' predictions are all-gathered (no
gradient), so every rank builds the same graph W and pseudo-labels over the global batch; the transformed
predictions and feature maps are all-gathered with gradient (``gather_with_grad``), each rank scores its
own rows (anchors) against every column, and each rank's share is normalised by the global batch's counts
so that the mean over ranks is one process's loss; DDP's gradient averaging does the rest. The random
transform parameters are drawn for the global batch and each rank takes its own rows.

Deviations:
- the graph and pseudo-labels come from the current network on the originals of the same batch, one
  no-grad forward per step; the official code forwards a "large batch" of 1000 originals and then trains
  620 steps on 32-image sub-batches of it (``repeated: 10`` passes, two augmented draws each), so its
  targets lag the network by up to 620 steps. Within a step the T transformed copies are averaged in one
  update (official: one optimizer step per augmented draw);
- the triplets are picked deterministically by scanning each anchor's row of W cyclically from the next
  image (batches are shuffled, so it is a random neighbour): the first neighbour is the positive (the
  anchor itself when it has none) and the first two separated images are the negatives (fewer when the
  graph separates fewer; the negative expectation is over those found). The official ``get_pair`` scans
  the row from its start for every anchor (an indentation slip in ``get_fake_M`` skips j < N; ``get_pos_M``
  indexes the row with the anchor's own entry removed without shifting back, and takes a non-neighbour
  when there is none) and raises "threshold is too low" when an anchor has fewer than two negatives;
- M is the map entering the backbone's last spatial reduction (the shared ``find_feature_maps``: 8 x 8 x
  128 for small_cnn at 32 px), any backbone's; the official map is the output of the first pooling of its
  4-conv CIFAR network (layer 7: 14 x 14 x 64). The cluster head is the official ``fc_layer`` (Linear 64,
  BN, ReLU, Linear K, BN, softmax, linear weights initialised to the identity) on the backbone's pooled
  features, with BatchNorm keeping running statistics for evaluation (official: batch statistics always);
- S'_ij is clamped to [0, 1]; the official code divides it by its maximum (the diagonal, 1 up to
  rounding), the same in exact arithmetic;
- the transform interpolates bilinearly (keras' ``apply_transform`` of that time used order 0, nearest);
  the flip comes before the affine transform (keras: after it), the same distribution since the affine
  parameters are drawn symmetrically;
- AdamW with betas (0, 0.9) and no weight decay stands for RMSprop(alpha=0.9) (the harness's optimizers):
  the same update but for Adam's bias correction of the second moment in the first steps; the harness's
  cosine schedule (official: constant 1e-4).
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
    num_clusters: int = 0
    """K; 0: the data set's number of classes (``setup``), as the official configs set it per data set
    (``num_classes: 10`` in cfgs/cifar10.yaml, 20 in cifar100.yaml)."""
    hidden_dim: int = 64
    """Width of the cluster head's hidden layer (official ``Cifar_C4_L2.fc_layer``: Linear(256, 64))."""
    graph_threshold: float = 0.95
    """s: pairs of originals whose predictions have cosine similarity >= s are linked in the pseudo-graph
    (official ``thresh: 0.95``, cfgs/cifar10.yaml; constant over training)."""
    label_threshold: float = 0.9
    """t: an original whose largest probability is >= t gets a pseudo-label (official ``comp_simi``:
    ``thres = 0.9``; constant)."""
    graph_weight: float = 1.0
    """Weight of the pseudo-graph loss (official ``coeff: graph: 1``)."""
    label_weight: float = 5.0
    """Weight of the pseudo-label loss (official ``coeff: label: 5``)."""
    mi_weight: float = 0.05
    """Weight of the triplet mutual information loss (official ``coeff: local: 0.05``)."""
    mi_hidden_dim: int = 512
    """Channels of the discriminator's two hidden 1x1 convs (official ``interm_channels_L=512``)."""
    num_transformed: int = 2
    """T, transformed copies of each original per step (official ``main.py``: two augmented draws of each
    small batch, ``if sign > 1: break``)."""
    rotation: float = 20.0
    """Largest rotation in degrees, uniform in [-r, r] (official ``rotation_range=20``)."""
    shift: float = 0.18
    """Largest shift as a fraction of the side, uniform per axis (official ``width_shift_range=0.18``,
    ``height_shift_range=0.18``)."""
    zoom: tuple[float, float] = (0.85, 1.15)
    """Zoom range, drawn independently per axis (official ``zoom_range=[0.85, 1.15]``)."""
    channel_shift: float = 0.1
    """Largest shift of each channel's values on the [0, 1] scale (official ``channel_shift_range=0.1``
    on ``ToTensor`` images)."""
    rescale: float = 0.95
    """Factor on the transformed images' values (official ``rescale=0.95``)."""
    flip: bool = True
    """Random horizontal flip of the transformed copies (official ``horizontal_flip=True``)."""
    optimizer: str = "adamw"
    """Official RMSprop(alpha=0.9) (``main.py``); AdamW with betas (0, 0.9) and no decay here (Deviations)."""
    base_lr: float = 8e-4
    """Official ``lr: 0.0001`` at ``small_bs: 32``, i.e. 8e-4 per 256 images."""
    betas: tuple[float, float] = (0.0, 0.9)
    """No first moment, RMSprop's second-moment decay ``alpha=0.9`` (official ``main.py``)."""
    weight_decay: float = 0.0
    """RMSprop's default: none (official ``main.py`` sets none)."""
    momentum: float = 0.0
    """RMSprop's default momentum 0 (unused by AdamW)."""
    warmup_epochs: int = 0
    """No warm-up (official ``main.py``)."""
    epochs: int = 2000
    """Official ``epochs: 200``, each of which trains on every image ``repeated: 10`` times (twice
    transformed each time): 2000 passes over the data here, with T = 2 copies per pass."""
    batch_size: int = 32
    """Official ``small_bs: 32``, the batch of every loss term and step."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - mi_hidden_dim 64: the 512-wide discriminator scores 4 N pairs at 64 locations through a 512 x 512 conv,
#   ~9 GFLOP a step on the CPU; the official value is for GPUs;
# - num_transformed 1: one transformed copy per step, halving the backbone's work (the official two draws
#   are two sequential steps, not one loss);
# - base_lr 4e-3: the official 1e-4 (at batch 32) is for 2000 passes over the data; batch 64 (the harness's
#   preset batch) puts 64 x 64 pairs in the graph.
# It does not beat random init on k-NN of the backbone's features here (random init 83.9%): base_lr 4e-3 gave
# 75.8% (assign NMI 0.61 against 0.21 at random init, the clustering itself learns), 8e-4 (the official
# rate) 65.8%, 2e-3 70.0%, 1.6e-2 74.2%, and 4e-3 with mi_weight 1.0 54.4%.
PRESETS = {"small": dict(mi_hidden_dim=64, num_transformed=1, base_lr=4e-3, epochs=15, batch_size=64)}


# --- augmentations (official ``main.py``: ToTensor originals, keras ImageDataGenerator copies) -----------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """1 + T views: the original, then T copies with a random horizontal flip; the affine and colour part
    of the official transform is made in ``forward`` (``keras_transform``). The crop of scale and aspect
    1 is the whole (square) image at ``image_size``. Each view takes a PIL image or a uint8 tensor."""
    whole = v2.RandomResizedCrop(image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), antialias=True)
    original = v2.Compose([v2.ToImage(), whole, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    steps = [v2.ToImage(), whole] + ([v2.RandomHorizontalFlip()] if cfg.flip else [])
    copy = v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return [original] + [copy] * cfg.num_transformed


def keras_transform(x: torch.Tensor, u: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The official random transform of images x (N, C, H, W) on the [0, 1] scale, with its random
    numbers u (N, 5 + C) uniform in [0, 1): rotation, row and column shift, row and column zoom (one
    affine map per image, output -> input coordinates about the centre as keras' ``transform_matrix``,
    nearest-edge fill), then a shift per channel clipped to the image's range, then the rescale."""
    n, c = x.shape[:2]
    u = u.to(x.device, x.dtype)
    angle = (2 * u[:, 0] - 1) * math.radians(cfg.rotation)  # (N,)
    shift = (2 * u[:, 1:3] - 1) * cfg.shift * 2  # (N, 2) rows, cols; a fraction of the side is 2x it normalised
    zoom = cfg.zoom[0] + u[:, 3:5] * (cfg.zoom[1] - cfg.zoom[0])  # (N, 2) rows, cols
    cos, sin = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (N, 2, 2) on (x, y)
    scale = torch.diag_embed(zoom.flip(1))  # (N, 2, 2): x is the column, y the row
    theta = torch.cat([rot @ scale, (rot @ shift.flip(1)[:, :, None])], dim=2)  # (N, 2, 3): R (Z p + t)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lo = out.flatten(1).min(dim=1).values[:, None, None, None]  # (N, 1, 1, 1): the image's range
    hi = out.flatten(1).max(dim=1).values[:, None, None, None]
    delta = (2 * u[:, 5 : 5 + c] - 1) * cfg.channel_shift  # (N, C)
    out = torch.minimum(torch.maximum(out + delta[:, :, None, None], lo), hi)  # keras' random_channel_shift
    return out * cfg.rescale


# --- the feature map inside the backbone ----------------------------------------------------------------


def _reduces(m: nn.Module) -> bool:
    """A layer that lowers the resolution of a feature map, global pooling (to 1 x 1) excluded."""
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Conv2d)):
        stride = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
        return tuple(stride) != (1, 1)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        return tuple(size) != (1, 1)
    return False


def find_feature_maps(backbone: nn.Module) -> tuple[str, int, int]:
    """(the name of the backbone's last spatial reduction of a feature map, the channels of the map it
    receives, the channels of the backbone's final map), from the module tree in registration order: a
    strided conv's in_channels, or for a pool the width of the last conv or BN before it."""
    width, found = None, None
    for name, m in backbone.named_modules():
        if next(m.children(), None) is not None:
            continue  # leaves only
        if _reduces(m):
            incoming = m.in_channels if isinstance(m, nn.Conv2d) else width
            if width is not None:  # a reduction before any conv works on the image itself
                found = (name, incoming)
        if isinstance(m, nn.Conv2d):
            width = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            width = m.num_features
    if found is None:
        raise ValueError(f"{type(backbone).__name__}: no feature map found (no pooling or strided convolution after a "
                         "convolution); a convolutional backbone is needed")
    return found[0], found[1], width


def forward_with_maps(backbone: nn.Module, x: torch.Tensor, reduction: str,
                      final: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward of the backbone: (its output (N, D), the map entering its submodule ``reduction``
    (N, C, H, W), and with ``final`` the last map of more than 1 x 1 that any layer outputs, else None).
    The hooks live only for this call."""
    maps: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        maps["local"] = args[0]

    def keep_output(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
            maps["final"] = out

    handles = [backbone.get_submodule(reduction).register_forward_pre_hook(keep_input)]
    if final:
        handles += [m.register_forward_hook(keep_output) for m in backbone.modules() if next(m.children(), None) is None]
    try:
        y = backbone(x)
    finally:
        for h in handles:
            h.remove()
    return y, maps["local"], maps.get("final")


# --- heads ----------------------------------------------------------------------------------------------


class ClusterHead(nn.Module):
    """The official ``fc_layer``: Linear(D, 64), BN, ReLU, Linear(64, K), then BN and softmax; linear weights
    start as the identity (``eye_``) and biases at 0. forward: (N, D) -> (Y (N, K) the last linear output,
    the deep feature of the MI term; p (N, K) the prediction)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_clusters: int):
        super().__init__()
        self.num_clusters = num_clusters
        self.hidden = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                    nn.Linear(hidden_dim, num_clusters))
        self.norm = nn.BatchNorm1d(num_clusters)
        for m in self.hidden:
            if isinstance(m, nn.Linear):
                nn.init.eye_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.hidden(h)  # (N, K)
        return y, self.norm(y).float().softmax(dim=1)


class LocalDiscriminator(nn.Module):
    """T(M^(l), Y): the concatenation [M^(l); Y] through 1x1 convs (C + K) -> H -> H -> 1 with ReLUs and no
    biases (official ``LocalDiscriminator``). The first conv is linear, so it is applied to the maps and to
    the Ys apart and the pairs are summed, instead of concatenating a copy of Y at every location."""

    def __init__(self, map_channels: int, y_dim: int, hidden_dim: int):
        super().__init__()
        self.map_channels = map_channels
        self.c0 = nn.Conv2d(map_channels + y_dim, hidden_dim, 1, bias=False)
        self.c1 = nn.Conv2d(hidden_dim, hidden_dim, 1, bias=False)
        self.c2 = nn.Conv2d(hidden_dim, 1, 1, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor, anchor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Scores (P, L) of the P pairs (Y_anchor[p], M_other[p]) at every location: y (A, K), m (B, C, L),
        anchor (P,) rows of y, other (P,) rows of m."""
        w = self.c0.weight[:, :, 0, 0]  # (H, C + K)
        wm, wy = w[:, : self.map_channels], w[:, self.map_channels :]
        am = torch.einsum("hc,bcl->bhl", wm, m)  # (B, H, L)
        ay = y @ wy.T  # (A, H)
        h = F.relu(am[other] + ay[anchor][:, :, None])  # (P, H, L)
        h = F.relu(torch.einsum("gh,phl->pgl", self.c1.weight[:, :, 0, 0], h))  # (P, H, L)
        return torch.einsum("h,phl->pl", self.c2.weight[0, :, 0, 0], h)  # (P, L)


# --- pseudo-graph, pseudo-labels, triplets and the losses -------------------------------------------------


def cosine_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """S (A, B): S_ij = p_i . q_j / (|p_i| |q_j|) of predictions p (A, K), q (B, K) (official ``comp_simi``)."""
    return F.normalize(p, dim=1) @ F.normalize(q, dim=1).T


@torch.no_grad()
def pseudo_graph(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """W (N, N) bool: W_ij = S_ij >= s for the originals' predictions p (N, K) (official ``similarity.ge(thresh)``)."""
    return cosine_similarity(p, p) >= threshold


@torch.no_grad()
def pseudo_labels(p: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,) the argmax of p (N, K), confident (N,) bool: max_k p_ik >= t) (official ``comp_simi``)."""
    top, labels = p.max(dim=1)
    return labels, top >= threshold


def graph_loss(p_rows: torch.Tensor, p_all: torch.Tensor, graph_rows: torch.Tensor) -> torch.Tensor:
    """L_graph over rows (A, K) of the transformed predictions against all of them p_all (B, K), with the
    graph's rows graph_rows (A, B): the mean binary cross-entropy of S' against W (logs clamped at -100,
    as ``nn.BCELoss``)."""
    s = cosine_similarity(p_rows.float(), p_all.float()).clamp(0.0, 1.0)  # (A, B)
    return F.binary_cross_entropy(s, graph_rows.to(s.dtype))


def label_loss(p: torch.Tensor, labels: torch.Tensor, confident: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L_label: the official ``WeightedBCE`` of the transformed predictions p (N, K) against the one-hot
    pseudo-labels (N,), per class, averaged over classes, weighted by confident (N,) and averaged over
    the N images (not only the confident ones)."""
    target = F.one_hot(labels, p.shape[1]).to(p.dtype)  # (N, K)
    bce = -(target * (p + eps).log() + (1 - target) * (1 - p + eps).log())  # (N, K)
    return (confident.to(p.dtype) * bce.mean(dim=1)).mean()


@torch.no_grad()
def triplet_pairs(graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every anchor i of the graph W (N, N): (positive (N,) its first neighbour j != i scanning
    i+1, i+2, ... cyclically, i itself when it has none; negatives (N, 2) its first two images with
    W_ij = 0 in the same scan; valid (N, 2) bool, False where fewer than two exist)."""
    n = len(graph)
    own = torch.arange(n, device=graph.device)
    if n == 1:
        return own, own[:, None].repeat(1, 2), torch.zeros(1, 2, dtype=torch.bool, device=graph.device)
    order = (own[:, None] + 1 + own[None, : n - 1]) % n  # (N, N - 1): the others, from the next one on
    linked = graph.gather(1, order)  # (N, N - 1)
    first = linked.float().argmax(dim=1, keepdim=True)  # the first True (argmax takes the first maximum)
    positive = torch.where(linked.any(dim=1), order.gather(1, first).squeeze(1), own)
    apart = ~linked
    count = apart.long().cumsum(dim=1)  # (N, N - 1): how many separated images up to here
    negatives, valid = [], []
    for k in (1, 2):
        hit = apart & (count == k)  # the k-th separated image, if any
        found = hit.any(dim=1)
        idx = order.gather(1, hit.float().argmax(dim=1, keepdim=True)).squeeze(1)
        negatives.append(torch.where(found, idx, own))
        valid.append(found)
    return positive, torch.stack(negatives, dim=1), torch.stack(valid, dim=1)


def jsd_mi_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor, neg_valid: torch.Tensor,
                neg_total: int | None = None, world: int = 1) -> torch.Tensor:
    """L_MI = -(E_P[-sp(-T)] - E_N[sp(T)]) (official ``DIM_Loss``): pos_scores (P, L) every positive pair
    at every location, neg_scores (Q, L) the negatives, neg_valid (Q,) which negatives exist. E_N is over
    the ``neg_total`` valid negatives of the global batch (default: this call's); a rank's share of it is
    scaled by ``world`` so that the mean over ranks is the global batch's (E_P: every rank holds as many
    positives)."""
    e_joint = -F.softplus(-pos_scores).mean()  # E_P[-sp(-T(x, y))]
    total = int(neg_valid.sum()) if neg_total is None else neg_total
    neg = F.softplus(neg_scores) * neg_valid[:, None].to(neg_scores.dtype)  # (Q, L)
    e_marginal = world * neg.sum() / (max(total, 1) * neg_scores.shape[1])  # E_N[sp(T(x', y))]
    return -(e_joint - e_marginal)


# --- distributed ------------------------------------------------------------------------------------


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


# --- model ------------------------------------------------------------------------------------------


class DCCM(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.reduction, self.map_channels, _ = find_feature_maps(backbone)
        self._build_heads(cfg.num_clusters or 10)  # setup() sizes them from the data set
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)), persistent=False)

    def _build_heads(self, num_clusters: int) -> None:
        cfg = self.cfg
        self.head = ClusterHead(self.feature_dim, cfg.hidden_dim, num_clusters)
        # only when the term is on: DDP expects every parameter to get a gradient
        self.discriminator = (LocalDiscriminator(self.map_channels, num_clusters, cfg.mi_hidden_dim)
                              if cfg.mi_weight > 0 else None)

    def set_normalization(self, mean, std) -> None:
        """The data set's per-channel mean and std, undone before the transform of ``forward``."""
        self.mean = torch.as_tensor(mean, dtype=self.mean.dtype, device=self.mean.device)
        self.std = torch.as_tensor(std, dtype=self.std.dtype, device=self.std.device)

    def setup(self, num_samples: int, num_classes: int) -> None:
        """K = the data set's number of classes unless the Config sets ``num_clusters``."""
        if not self.cfg.num_clusters and num_classes != self.head.num_clusters:
            device = self.std.device
            self._build_heads(num_classes)
            self.to(device)

    def transform(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``keras_transform`` of normalised views x (N, C, H, W): undo the normalisation, transform, redo it."""
        mean, std = self.mean.to(x.dtype)[:, None, None], self.std.to(x.dtype)[:, None, None]
        return (keras_transform(x * std + mean, u, self.cfg) - mean) / std

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x, copies = batch["views"][0], batch["views"][1:]  # originals (N, C, H, W), then T copies
        if not copies:
            raise ValueError("DCCM: needs the original and at least one transformed copy")
        world, rank = _world()
        n = len(x)
        rows = slice(rank * n, (rank + 1) * n)  # this rank's anchors in the global batch
        with torch.no_grad():  # the targets: the originals' predictions (official: the large batch, no_grad)
            p = concat_all_gather(self.head(self.backbone(x))[1])  # (N_global, K)
            graph = pseudo_graph(p, cfg.graph_threshold)  # (N_global, N_global)
            labels, confident = pseudo_labels(p, cfg.label_threshold)  # (N_global,) each
            positive, negatives, valid = triplet_pairs(graph)  # (N_global,), (N_global, 2) x 2
        terms = {"graph": 0.0, "label": 0.0, "mi": 0.0}
        for xt in copies:
            u = torch.rand(n * world, 5 + xt.shape[1])[rows]  # drawn for the global batch: ranks agree
            h, m, _ = forward_with_maps(self.backbone, self.transform(xt, u), self.reduction)  # (N, D), (N, C, H, W)
            y, pt = self.head(h)  # (N, K), (N, K)
            pt_all, _ = gather_with_grad(pt)  # (N_global, K)
            terms["graph"] = terms["graph"] + graph_loss(pt, pt_all, graph[rows])
            terms["label"] = terms["label"] + label_loss(pt, labels[rows], confident[rows])
            if self.discriminator is not None:
                m_all, _ = gather_with_grad(m.flatten(2).float())  # (N_global, C, L)
                own = torch.arange(rows.start, rows.stop, device=x.device)
                anchor = torch.arange(n, device=x.device)
                pos = self.discriminator(y.float(), m_all, anchor.repeat(2), torch.cat([own, positive[rows]]))  # (2N, L)
                neg = self.discriminator(y.float(), m_all, anchor.repeat(2), negatives[rows].T.flatten())  # (2N, L)
                neg_total = int(valid.sum())
                terms["mi"] = terms["mi"] + jsd_mi_loss(pos, neg, valid[rows].T.flatten(), neg_total, world)
        terms = {k: v / len(copies) for k, v in terms.items()}
        loss = cfg.graph_weight * terms["graph"] + cfg.label_weight * terms["label"] + cfg.mi_weight * terms["mi"]
        with torch.no_grad():
            stats = {"graph_loss": terms["graph"], "label_loss": terms["label"], "mi_loss": terms["mi"],
                     "graph_density": graph.float().mean(), "confident": confident.float().mean(),
                     "clusters_used": torch.tensor(float(labels.unique().numel()))}
        return {"loss": loss, **{k: torch.as_tensor(v).detach() for k, v in stats.items()}}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features, (N, D)."""
        return self.backbone(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The cluster probabilities p, (N, K)."""
        return self.head(self.backbone(x))[1]

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The argmax of the prediction, (N,) in [0, K): the official test's ``torch.max(vec, 1)``."""
        return self.predict(x).argmax(dim=1)


MODEL = DCCM


if __name__ == "__main__":
    k = 4
    one_hot = torch.eye(k).repeat(3, 1)  # 12 images, 3 per cluster, confident and consistent
    w = pseudo_graph(one_hot, 0.95)
    labels, confident = pseudo_labels(one_hot, 0.9)
    print("graph loss of a perfect prediction", graph_loss(one_hot, one_hot, w).item())
    print("label loss of a perfect prediction", label_loss(one_hot, labels, confident).item())
    flat = torch.full((12, k), 1 / k)
    print("graph loss of a constant prediction", graph_loss(flat, flat, w).item())
