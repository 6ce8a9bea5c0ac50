"""Contrastive Clustering (CC) — Li, Hu, Liu, Peng, Zhou, Peng. "Contrastive Clustering". AAAI 2021,
arXiv:2009.09687. Catalog id: ``li-2021-contrastive-clustering``.
Official code: https://github.com/Yunfan-Li/Contrastive-Clustering (``modules/network.py``,
``modules/contrastive_loss.py``, ``train.py``, ``config/config.yaml``).

A shared backbone f carries two heads. For two augmented views a, b of a batch of N images, h^k = f(x^k):

- the instance head g_I (Linear-ReLU-Linear to 128-d, L2-normalised) gives rows z_i^k; the instance-level
  loss is NT-Xent over the 2N rows of the 2N x 2N cosine-similarity matrix (Eq. 2-3),

      l_i^a = -log exp(s(z_i^a, z_i^b) / tau_I) / sum_{j} [exp(s(z_i^a, z_j^a) / tau_I) + exp(s(z_i^a, z_j^b) / tau_I)],

  the self-pair j = i left out of the first sum, L_ins = 1/(2N) sum_i (l_i^a + l_i^b);
- the cluster head g_C (Linear-ReLU-Linear to M logits, softmax) gives the N x M assignment matrix Y^k.
  Its COLUMNS y_1^k..y_M^k (each an N-vector: how much of the batch falls in cluster j) are the cluster
  representations; the cluster-level loss is NT-Xent over the 2M columns with the cluster temperature
  (Eq. 5-6), minus the entropy of the batch's cluster marginals (Eq. 7):

      lhat_j^a = -log exp(s(y_j^a, y_j^b) / tau_C) / sum_{k} [exp(s(y_j^a, y_k^a) / tau_C) + exp(s(y_j^a, y_k^b) / tau_C)],
      H(Y) = - sum_j [P(Y_j^a) log P(Y_j^a) + P(Y_j^b) log P(Y_j^b)],   P(Y_j^k) = sum_t Y_tj^k / ||Y^k||_1,
      L_clu = 1/(2M) sum_j (lhat_j^a + lhat_j^b) - H(Y),

and L = L_ins + L_clu (Eq. 8, the two terms unweighted). The code adds 2 log M, i.e. it minimises
sum_k (log M - H(P(Y^k))) (official ``ClusterLoss``: ``ne = log(M) + sum p log p`` per view), which is
zero for uniform marginals and changes no gradient; it is kept so that the loss reads as the official
one. The cluster index of an image is the argmax of its assignment row (official ``forward_cluster``).

Collapse: in the instance loss the 2(N - 1) other rows are negatives, so a constant embedding pays
log(2N - 1). In the cluster loss the columns of other clusters are the negatives: if every image gets the
same assignment row, every column is a multiple of the all-ones vector, all 2M columns point the same way
and the contrastive part is log(2M - 1), its value for indistinguishable clusters. The entropy term
penalises uneven cluster sizes, log M - H(P(Y^k)) >= 0 per view, with its maximum log M when the whole
batch falls into one cluster and 0 for uniform marginals; it rules out the trivial solution that the
contrastive part alone would allow, most samples in a few clusters (paper, "Cluster-level Contrastive
Head").

Distributed: both losses are over the global batch. The instance loss follows SimCLR's: the rows of each
view are all-gathered with gradient, each rank scores its own 2n anchors against the 2N_global rows, and
the rank mean is the one-process mean over 2N_global anchors. The cluster loss needs the whole global
assignment matrix (columns of N_global entries, marginals summed over the global batch): the N x M
matrices of both views are all-gathered with gradient (``gather_with_grad``, whose backward sums the
gradients of a rank's slice over the ranks) before the columns are formed, and every rank computes the
same global cluster loss; DDP's average of W identical losses' gradients, each summed over W ranks by the
gather's backward, is the one-process gradient. The official code runs on one GPU.

Deviations:
- images stay at the data set's size: the official config resizes every data set to 224 px
  (``image_size: 224``, CIFAR's 32 px upsampled);
- the Gaussian blur (official: OpenCV, kernel 23 at 224 px, p 0.5, sigma 0.1-2, used for ImageNet-10 and
  ImageNet-dogs only) is a v2 ``GaussianBlur`` with a kernel of about 10% of the side (23 / 224) and is
  dropped below 64 px, so that the views run batched on the device;
- the cosine similarity of columns uses ``F.normalize`` (eps 1e-12 on each norm; official
  ``nn.CosineSimilarity``, eps 1e-8), and the marginals' log is clamped at 1e-30 so that an exactly empty
  cluster (a softmax that underflowed) gives 0 log 0 = 0 rather than NaN;
- the STL-10 protocol (the instance loss alone on the unlabeled split, then both losses on train + test,
  official ``train_STL10.py``) is not reproduced: one data set, both losses every step, as ``train.py``.
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
    """Output width of the instance head, the row space (official ``feature_dim: 128``; paper, Sec.
    "Implementation Details": 128-d instance features)."""
    proj_hidden_dim: int = 0
    """Hidden width of both heads, Linear-ReLU-Linear without BN; 0 for the backbone's feature width, as
    the official ``Network`` does (``rep_dim`` -> ``rep_dim``: 512 for its ResNet34)."""
    num_clusters: int = 0
    """M, the cluster head's width; 0 for the data set's number of classes, told by ``setup`` (official
    ``train.py``: ``class_num`` 10 for CIFAR-10, 20 super-classes for CIFAR-100, 200 for Tiny-ImageNet).
    Before ``setup`` the head has 10 clusters (CIFAR-10's)."""
    instance_temperature: float = 0.5
    """tau_I of the instance loss (official ``instance_temperature: 0.5``)."""
    cluster_temperature: float = 1.0
    """tau_C of the cluster loss (official ``cluster_temperature: 1.0``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official ``RandomResizedCrop(size)``, torchvision's
    default scale (0.08, 1))."""
    jitter_strength: float = 0.5
    """s of ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p 0.8 (official ``Transforms(s=0.5)`` for CIFAR-10,
    CIFAR-100 and Tiny-ImageNet; s = 1 for STL-10, ImageNet-10 and ImageNet-dogs)."""
    blur: bool = False
    """Gaussian blur, p 0.5 (official ``blur=True`` for ImageNet-10 and ImageNet-dogs only; the paper lists it
    among the five augmentations: ResizedCrop, ColorJitter, Grayscale, HorizontalFlip, GaussianBlur)."""
    optimizer: str = "adamw"
    """Adam (official ``torch.optim.Adam``); AdamW with no weight decay is the same update."""
    base_lr: float = 3e-4
    """Official ``learning_rate: 0.0003`` at batch 256, i.e. 3e-4 per 256 images."""
    weight_decay: float = 0.0
    """Official ``weight_decay: 0.``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's defaults (the official optimizer sets none)."""
    constant_lr: bool = True
    """A constant rate: the official ``train.py`` has no scheduler and no warm-up (``param_groups`` marks the
    group ``fixed_lr`` for the harness)."""
    warmup_epochs: int = 0
    """None in the official code."""
    epochs: int = 1000
    """Official ``epochs: 1000``, trained from scratch."""
    batch_size: int = 256
    """Official ``batch_size: 256``."""
    sync_batchnorm: bool = False
    """The official code runs on one GPU: BN statistics of the whole batch; set it under DDP to match."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn, 256-d):
# - epochs 15: the harness's budget (the paper's 1000 epochs of CIFAR-10's 60,000 images are 234,000 steps);
# - base_lr 4e-3, i.e. 1e-3 at batch 64: the official 3e-4 is an absolute Adam rate at batch 256; linear
#   scaling would leave 7.5e-5 at batch 64, and 330 steps need a larger rate to move the heads at all;
# - min_scale 0.4: 8% of an 8x8 digit upscaled to 32 px is a blob (as SimCLR's small preset);
# - the heads keep the official shapes: hidden width = the backbone's 256, 128-d instance features, and M from
#   setup (10 digits).
PRESETS = {
    "small": dict(epochs=15, base_lr=4e-3, min_scale=0.4),
}


# --- augmentations (official modules/transform.py) ------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from the same pipeline: random resized crop, flip, colour jitter (0.8s, 0.8s, 0.8s, 0.2s)
    with p 0.8, grayscale p 0.2, then (``blur``, at >= 64 px) a Gaussian blur p 0.5, sigma 0.1-2 (official
    ``Transforms``). Each takes a PIL image or a uint8 tensor."""
    s = cfg.jitter_strength
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if cfg.blur and image_size >= 64:
        kernel = max(3, int(image_size * 23 / 224) // 2 * 2 + 1)  # odd; 23 at 224 px
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads (official modules/network.py) ----------------------------------------------------------


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-ReLU-Linear, no BN (official ``instance_projector`` and ``cluster_projector``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


# --- losses ---------------------------------------------------------------------------------------


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


def instance_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_ins (Eq. 2-3): NT-Xent over the rows, averaged over the 2N anchors. z1, z2: (N, D) instance features
    of the two views (normalised here). Under DDP the keys are the global batch's 2 N_global rows and this
    rank's 2N anchors are scored; the rank mean is the global mean (official ``InstanceLoss``)."""
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all1, offset = gather_with_grad(z1)  # (N_global, D)
    all2, _ = gather_with_grad(z2)
    n_global = all1.shape[0]
    keys = torch.cat([all1, all2])  # (2 N_global, D)
    queries = torch.cat([z1, z2])  # (2N, D)
    logits = queries @ keys.T / temperature  # (2N, 2 N_global)
    local = torch.arange(n, device=z1.device) + offset
    self_col = torch.cat([local, local + n_global])  # each anchor's own column ...
    pos_col = torch.cat([local + n_global, local])  # ... and its other view's
    logits[torch.arange(2 * n, device=z1.device), self_col] = float("-inf")  # j != i
    return F.cross_entropy(logits, pos_col)


def cluster_contrastive_loss(c1: torch.Tensor, c2: torch.Tensor, temperature: float) -> torch.Tensor:
    """1/(2M) sum_j (lhat_j^a + lhat_j^b) (Eq. 5-6): NT-Xent over the 2M COLUMNS of the two views' assignment
    matrices c1, c2 (N, M), each column an N-vector, with cosine similarity (official ``ClusterLoss``)."""
    m = c1.shape[1]
    cols = F.normalize(torch.cat([c1.T, c2.T]), dim=1)  # (2M, N): cluster representations y_j^a, then y_j^b
    logits = cols @ cols.T / temperature  # (2M, 2M)
    rows = torch.arange(2 * m, device=c1.device)
    logits[rows, rows] = float("-inf")  # k != j
    return F.cross_entropy(logits, (rows + m) % (2 * m))  # the same cluster in the other view


def cluster_entropy(c: torch.Tensor) -> torch.Tensor:
    """H(P(Y)) = - sum_j P_j log P_j of the batch's cluster marginal P_j = sum_t c_tj / ||c||_1. c: (N, M)."""
    p = c.sum(dim=0)  # (M,)
    p = p / p.sum()
    return -(p * p.clamp_min(1e-30).log()).sum()


def cluster_loss(c1: torch.Tensor, c2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_clu + 2 log M, the contrastive part, H(Y)) for this rank's assignment matrices c1, c2 (n, M), rows
    on the simplex. Both are all-gathered with gradient first, so that the columns and the marginals are
    the global batch's (N_global, M) on every rank."""
    c1, _ = gather_with_grad(c1)  # (N_global, M)
    c2, _ = gather_with_grad(c2)
    contrastive = cluster_contrastive_loss(c1, c2, temperature)
    entropy = cluster_entropy(c1) + cluster_entropy(c2)  # H(Y), both views
    m = c1.shape[1]
    return contrastive + 2 * math.log(m) - entropy, contrastive, entropy


# --- model ----------------------------------------------------------------------------------------


class ContrastiveClustering(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.hidden_dim = cfg.proj_hidden_dim or feature_dim
        self.instance_head = mlp_head(feature_dim, self.hidden_dim, cfg.proj_dim)  # g_I
        self.cluster_head = mlp_head(feature_dim, self.hidden_dim, cfg.num_clusters or 10)  # g_C, logits

    @property
    def num_clusters(self) -> int:
        return self.cluster_head[-1].out_features

    def setup(self, num_samples: int, num_classes: int) -> None:
        """M = the data set's number of classes unless the Config sets it (official ``class_num``): the cluster
        head's last layer is rebuilt when its width differs."""
        m = self.cfg.num_clusters or num_classes
        if m < 2:
            raise ValueError(f"Contrastive Clustering needs at least 2 clusters, got M = {m}")
        if m != self.num_clusters:
            old = self.cluster_head[-1]
            self.cluster_head[-1] = nn.Linear(self.hidden_dim, m).to(old.weight.device)

    def param_groups(self) -> list[dict]:
        """One group, at a constant rate when ``constant_lr`` (the official Adam has no schedule)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.cfg.weight_decay, "fixed_lr": self.cfg.constant_lr}]

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        n = x1.shape[0]
        h = torch.cat([self.backbone(x1), self.backbone(x2)])  # (2N, D); one call per view (BN per view), as official
        z1, z2 = self.instance_head(h).split(n)  # (N, proj_dim) each
        c1, c2 = torch.softmax(self.cluster_head(h).float(), dim=1).split(n)  # (N, M) each, rows on the simplex
        l_ins = instance_loss(z1, z2, cfg.instance_temperature)
        l_clu, contrastive, entropy = cluster_loss(c1, c2, cfg.cluster_temperature)
        with torch.no_grad():
            used = torch.cat([c1, c2]).argmax(dim=1).unique().numel() / self.num_clusters
        return {"loss": l_ins + l_clu, "instance_loss": l_ins.detach(), "cluster_loss": l_clu.detach(),
                "cluster_contrastive": contrastive.detach(), "cluster_entropy": entropy.detach() / 2,
                "used_clusters": torch.tensor(used)}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features h, before both heads."""
        return self.backbone(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The cluster of each image, (N,) in [0, M): the argmax of the cluster head (official ``forward_cluster``)."""
        return self.cluster_head(self.backbone(x)).argmax(dim=1)


MODEL = ContrastiveClustering


if __name__ == "__main__":
    c = torch.softmax(torch.randn(16, 4), 1)
    print("cluster loss, random:", cluster_loss(c, c.roll(1, 0), 1.0)[0].item(),
          "same views:", cluster_loss(c, c, 1.0)[0].item())
