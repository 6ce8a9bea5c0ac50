"""DeepCluster — Caron, Bojanowski, Joulin, Douze. "Deep Clustering for Unsupervised Learning of Visual
Features". ECCV 2018, arXiv:1807.05520. Catalog id: ``deepcluster``.
Official code: https://github.com/facebookresearch/deepcluster (``main.py``, ``clustering.py``).

Alternate between clustering the features and learning to predict the clusters (Sec. 3.2). At the start
of every epoch the convnet f_theta embeds the whole training set (centre crops, no augmentation); the
features are PCA-reduced to 256 dimensions, whitened and l2-normalised, and k-means (Eq. 2)

    min_C  1/N sum_n  min_{y_n in {0,1}^k, y_n^T 1 = 1}  || f_theta(x_n) - C y_n ||^2

gives each image a pseudo-label y_n. A freshly initialised classifier g_W (the "top layer") then trains
with the network on augmented images to predict them (Eq. 1):

    min_{theta, W}  1/N sum_n  w_{y_n} l(g_W(f_theta(x_n)), y_n),    w_c = N / (k' |c|),

with l the cross-entropy. The weight w_c of a cluster of |c| images (k' non-empty clusters) makes the
expected loss that of sampling images uniformly over the pseudo-classes, which the paper states is
equivalent (Sec. 3.3); the official code samples with ``UnifLabelSampler`` instead.

Collapse: two trivial solutions (Sec. 3.3). Empty clusters: k-means may leave a cluster without images;
then a non-empty cluster is picked at random and its centroid is split into two with a small random
perturbation, so that every cluster has members. A
trivial parametrisation: when most images fall into a few clusters, predicting those is enough; the
weights w_c (uniform sampling over the clusters) stop large clusters from dominating the loss. The
pseudo-labels are fixed during the epoch and take no gradient.

Distributed: the loss is per sample, so DDP's gradient averaging gives the global batch's. Every rank
embeds the whole training set in the epoch hook; the assignments of rank 0 are broadcast and the top
layer is re-initialised from a generator seeded by the epoch, so that every rank trains towards the same
labels with the same head.

Deviations:
- any backbone of the harness stands for AlexNet/VGG-16: the features clustered (and fed to the top
  layer) are its pooled output, not fc7 of AlexNet's classifier (whose ReLU the official code drops for
  clustering); with ``sobel`` the backbone's first convolution is rebuilt for the 2 Sobel channels;
- uniform sampling over pseudo-classes is done by weighting the loss, its stated equivalent (above);
- the harness's cosine learning-rate schedule; the official rate is constant (0.05). The top layer's
  group is plain SGD without momentum, as the official ``optimizer_tl`` (re-created every epoch, so it
  has no state to carry over); biases and BN parameters get no weight decay (official: all parameters);
- k-means is a short torch implementation (random data points as initial centroids, 20 Lloyd
  iterations, empty clusters split as Sec. 3.3 describes) that runs batched on the training device, not
  faiss; faiss perturbs a split centroid by a relative 1/1024 in alternating signs per dimension, which
  cannot split a cluster whose points are symmetric about that pattern, so the direction is random here;
- the random resized crop is bilinear so that it runs batched on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    num_clusters: int = 10000
    """k, the number of k-means clusters (official ``--nmb_cluster 10000``, main.py's default and main.sh)."""
    pca_dim: int = 256
    """PCA dimensions before whitening and l2 normalisation (official ``preprocess_features(pca=256)``)."""
    kmeans_iterations: int = 20
    """Lloyd iterations of each k-means (official ``run_kmeans``: ``clus.niter = 20``)."""
    reassign_epochs: int = 1
    """Epochs between two clusterings (official ``--reassign 1.``)."""
    uniform_sampling: bool = True
    """Weight the loss as uniform sampling over the pseudo-classes would (Sec. 3.3); False: plain
    cross-entropy, open to the trivial parametrisation."""
    sobel: bool = True
    """Fixed Sobel filtering of the grey-level image in front of the convnet, which removes colour
    (official main.sh ``--sobel``; models/alexnet.py)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official: torchvision's default)."""
    optimizer: str = "sgd"
    """SGD (official ``main.py``)."""
    base_lr: float = 0.05
    """Official ``--lr 0.05`` at ``--batch 256``, constant (here the harness's cosine, see Deviations)."""
    weight_decay: float = 1e-5
    """Official ``--wd -5``, i.e. 10^-5."""
    momentum: float = 0.9
    """Official ``--momentum 0.9`` (the top layer's optimizer has none)."""
    warmup_epochs: int = 0
    """No warm-up (official ``main.py``)."""
    epochs: int = 200
    """Official ``--epochs 200`` (default of main.py)."""
    batch_size: int = 256
    """Official ``--batch 256``."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - an epoch is 22 steps here, against 5,000 on ImageNet: a fresh top layer trained for 22 steps without
#   momentum learns nothing of 100 clusters (with num_clusters 100, re-clustering every epoch and base_lr
#   0.2 the loss stayed at log 100 and the pseudo-labels at chance for 230 steps). Hence
#   reassign_epochs 3 (66 steps per clustering, 5 clusterings in the run), num_clusters 50 (five per
#   class; 10,000 are ten per ImageNet class) and base_lr 0.8 (0.2 at batch 64);
# - min_scale 0.3: 8% crops of an 8x8 digit upscaled to 32 px are a blob.
PRESETS = {"small": dict(num_clusters=50, reassign_epochs=3, min_scale=0.3, base_lr=0.8, epochs=15)}


# --- augmentations (official ``cluster_assign``: RandomResizedCrop(224), RandomHorizontalFlip) -------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: a random resized crop and a horizontal flip, normalised (the Sobel filter, when on, is
    applied in the model). It takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- Sobel input, PCA whitening, k-means ----------------------------------------------------------


def sobel(x: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) horizontal and vertical Sobel responses of the grey level (the mean of the three
    normalised channels) of x (N, 3, H, W), zero-padded (official ``alexnet.py``: a fixed 1x1 conv with
    weights 1/3, then two fixed 3x3 Sobel kernels)."""
    grey = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([k, k.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    return F.conv2d(grey, kernels, padding=1)


def replace_input_conv(backbone: nn.Module, in_channels: int) -> None:
    """Rebuild the backbone's first convolution on 3 channels (a ResNet's stem, a ViT's patch embedding)
    for ``in_channels``, freshly initialised, in place."""
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, child.bias is not None, child.padding_mode)
                setattr(parent, name, new)
                return
    raise ValueError("sobel: the backbone has no convolution on 3 input channels to rebuild for 2")


@torch.no_grad()
def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-10) -> torch.Tensor:
    """x (N, D) centred, projected on its top ``dim`` principal directions, each divided by the square
    root of its eigenvalue (whitened; faiss ``PCAMatrix(eigen_power=-0.5)``), then l2-normalised per row.
    Returns (N, min(dim, D))."""
    x = x.float()
    xc = x - x.double().mean(dim=0).float()  # (N, D); float32, as N x D in float64 would not fit at scale
    cov = (xc.T @ xc).double() / len(x)  # (D, D), decomposed in float64
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    val, vec = eigval.flip(0)[:dim], eigvec.flip(1)[:, :dim]  # (d,), (D, d): the top directions
    scale = val.clamp_min(eps * float(eigval[-1]) + 1e-30).rsqrt()  # lambda^-1/2
    y = xc @ (vec * scale).float()  # (N, d), whitened
    return F.normalize(y, dim=1)


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


def cluster_weights(labels: torch.Tensor, k: int) -> torch.Tensor:
    """w_c = N / (k' |c|) for each of the k clusters (0 for empty ones), k' the number of non-empty
    clusters: weighting the loss by w_{y_n} gives the expectation of uniform sampling over the clusters."""
    counts = torch.bincount(labels, minlength=k).double()
    nonempty = int((counts > 0).sum())
    return torch.where(counts > 0, len(labels) / (nonempty * counts.clamp_min(1)), torch.zeros_like(counts)).float()


def deepcluster_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Eq. 1: the cross-entropy of the top layer's scores logits (N, k) against the pseudo-labels (N,),
    each sample weighted by its cluster's weights[labels] when ``weights`` (k,) is given; the mean over
    the batch."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    if weights is not None:
        ce = ce * weights[labels]
    return ce.mean()


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# --- model ----------------------------------------------------------------------------------------


class DeepCluster(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        if cfg.sobel:
            replace_input_conv(backbone, 2)
        self.backbone = backbone
        self.top_layer = nn.Linear(feature_dim, cfg.num_clusters)
        self._init_top_layer(torch.Generator().manual_seed(0))
        self.register_buffer("assignments", torch.full((0,), -1, dtype=torch.long))  # (N,), set by setup
        self.register_buffer("weights", torch.ones(cfg.num_clusters))  # w_c, (k,)

    def setup(self, num_samples: int, num_classes: int) -> None:
        """Room for one pseudo-label per training image; -1 until the first clustering."""
        if num_samples < self.cfg.num_clusters:
            raise ValueError(f"num_clusters {self.cfg.num_clusters} is above the {num_samples} training images")
        self.assignments = torch.full((num_samples,), -1, dtype=torch.long, device=self.weights.device)

    @torch.no_grad()
    def _init_top_layer(self, generator: torch.Generator) -> None:
        """Weights from N(0, 0.01^2), bias 0 (official ``main.py``), from ``generator`` so that every rank
        draws the same head."""
        w = torch.randn(self.top_layer.weight.shape, generator=generator) * 0.01
        self.top_layer.weight.copy_(w)
        self.top_layer.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(sobel(x) if self.cfg.sobel else x)  # (N, D)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        labels = self.assignments[batch["index"]]  # (N,) pseudo-labels of this epoch
        if len(self.assignments) == 0 or bool((labels < 0).any()):
            raise RuntimeError("DeepCluster has no pseudo-labels yet: setup() and on_epoch_start() (the "
                               "clustering) must run before the first step")
        logits = self.top_layer(self.features(x))  # (N, k)
        loss = deepcluster_loss(logits, labels, self.weights if self.cfg.uniform_sampling else None)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "pseudo_label_acc": acc}

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """Cluster the whole training set (every ``reassign_epochs``): PCA whitening, l2 normalisation and
        k-means on ``features()`` (N, D); the assignments and cluster weights replace the old ones and the
        top layer is drawn afresh."""
        cfg = self.cfg
        if epoch % cfg.reassign_epochs:
            return
        device = self.weights.device
        x = pca_whiten(features().to(device), cfg.pca_dim)  # (N, d)
        g = torch.Generator().manual_seed(1_000_003 * epoch + 17)
        labels, _ = kmeans(x, cfg.num_clusters, cfg.kmeans_iterations, g)
        world, _ = _world()
        if world > 1:  # one clustering for all ranks
            dist.broadcast(labels, src=0)
        self.assignments = labels.to(device)
        self.weights.copy_(cluster_weights(labels, cfg.num_clusters).to(device))
        self._init_top_layer(g)

    def param_groups(self) -> list[dict]:
        """Weight decay on weights, not on biases and norm parameters; the top layer as the official
        ``optimizer_tl``: the same rate and decay, no momentum."""
        top = list(self.top_layer.parameters())
        own = {id(p) for p in top}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        wd = self.cfg.weight_decay
        return [
            {"params": [p for p in rest if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0, "lars": False},
            {"params": top, "weight_decay": wd, "momentum": 0.0, "lars": False},
        ]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features of the (Sobel-filtered) images: what is clustered."""
        return self.features(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The top layer's predicted pseudo-class of each image, (N,)."""
        return self.top_layer(self.features(x)).argmax(dim=1)


MODEL = DeepCluster


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(50, 2, generator=g) * 0.1 + c for c in (torch.tensor([3.0, 0]), torch.tensor([-3.0, 0]))])
    labels, _ = kmeans(blobs, 2, 20, g)
    print("k-means on two blobs:", torch.bincount(labels).tolist())
