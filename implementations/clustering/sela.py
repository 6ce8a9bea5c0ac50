"""SeLa — Asano, Rupprecht, Vedaldi. "Self-labelling via simultaneous clustering and representation
learning". ICLR 2020, arXiv:1911.05371. Catalog id: ``sela``.
Official code: https://github.com/yukimasano/self-label (``main.py``, ``sinkhornknopp.py``).

One objective for the network and the labels: the cross-entropy between the network's class
probabilities p(y | x_i) (a softmax head on the features) and labels q(y | x_i),

    min_{p, q}  E(p, q) = - 1/N sum_i sum_y q(y | x_i) log p(y | x_i)
    subject to  sum_i q(y | x_i) = N / K for every y  (an equal partition of the N images into K labels).

Training alternates. The network steps on E with the labels fixed. Now and then the labels are
re-optimised for the current network: with the constraint, min over q is an optimal-transport problem
between the N images and the K labels with cost -log P. Its entropy-regularised relaxation has the
solution Q = diag(r) P^lambda diag(c) (lambda = 25), whose scalings r (K) and c (N) Sinkhorn-Knopp finds
by alternating r = (1/K) / (P^lambda c) and c = (1/N) / (r^T P^lambda) until c changes by less than
0.1 in total (official ``optimize_L_sk``); each image's label is the argmax of its column of Q. The
labels start as a random equal partition. There are several heads (10 in the paper's AlexNet run), each
with its own labels; the loss is the mean of their cross-entropies (official ``optimize_epoch``). Labels
are re-optimised 100 times over the run, at times spaced quadratically (more often early: official
``optimize_times = (epochs + 1.01) N linspace(0, 1, nopts)^2``).

Collapse: without the constraint the labels that minimise E given p are p's argmax, and a constant p
with one label for every image would be optimal. The equal partition makes every label hold N/K images
(about N/K once the transport plan is rounded to hard labels), so the network must tell images apart to
predict their labels.

Distributed: the loss is per sample, so DDP's gradient averaging gives the global batch's. Every rank
embeds the whole training set in the epoch hook; the labels of rank 0 are broadcast, so every rank
trains towards the same ones.

Deviations:
- labels are re-optimised at the start of an epoch: at the first epoch boundary at or after each of the
  official times (several times that fall in one epoch, as early in the run, give one optimisation);
- the class probabilities for the labels are computed on the evaluation transform of each image (the
  harness's ``features()``); the official code uses the training loader, augmented (its comment: "can
  also be DataLoader with less aug.");
- the heads act on the backbone's pooled features (AlexNet's fc7 in the paper's run);
- Sinkhorn-Knopp on lambda log P with each image's maximum subtracted, in float64: a per-image factor
  is absorbed by c, so the labels are those of P^lambda, without its underflow (p^25 of p ~ 1/3000);
- the harness's cosine learning-rate schedule (official: 0.08, times 0.1 every 150 epochs); biases and
  BN parameters get no weight decay (official: all parameters);
- the random resized crop is bilinear so that it runs batched on the device; the grayscale comes
  before the colour jitter as in the official ``augs 3`` pipeline, and the flip after it.
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
    num_clusters: int = 3000
    """K, labels per head (official ``--ncl 3000``, scripts/alexnet.sh)."""
    num_heads: int = 10
    """Heads, each with its own labels (official ``HC=10`` in scripts/alexnet.sh)."""
    lamb: float = 25.0
    """lambda, the inverse entropy regularisation: Sinkhorn-Knopp runs on P^lambda (official ``--lamb 25``)."""
    num_label_opts: int = 100
    """Label optimisations over the run, spaced quadratically (official ``--nopts 100``, scripts/alexnet.sh)."""
    sinkhorn_tolerance: float = 0.1
    """Stop when sum_i |c_i / c_i' - 1| < this, checked every 10 iterations (official ``optimize_L_sk``)."""
    sinkhorn_max_iterations: int = 10000
    """A bound on the iterations, which the official loop does not have."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official: torchvision's default)."""
    optimizer: str = "sgd"
    """SGD with momentum 0.9 (official ``Optimizer.optimize``)."""
    base_lr: float = 0.08
    """Official ``--lr 0.08`` (main.py's default; scripts/alexnet.sh does not set it) at batch 256."""
    weight_decay: float = 1e-5
    """Official ``--wd -5``, i.e. 10^-5."""
    momentum: float = 0.9
    """Official ``self.momentum = 0.9``."""
    warmup_epochs: int = 0
    """No warm-up (official main.py)."""
    epochs: int = 400
    """Official ``NEP=400`` (scripts/alexnet.sh)."""
    batch_size: int = 256
    """Official ``BS=256`` (scripts/alexnet.sh)."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - num_clusters 30, num_heads 3: three labels per class, as 3,000 are three per ImageNet class; three
#   heads instead of ten for a head of 1,437 images;
# - num_label_opts 15: 11 label optimisations in the 15 epochs (0-3, 5-7, 9, 10, 12, 14), the early
#   ones falling into the same epochs;
# - min_scale 0.3: 8% crops of an 8x8 digit upscaled to 32 px are a blob.
PRESETS = {"small": dict(num_clusters=30, num_heads=3, num_label_opts=15, min_scale=0.3, epochs=15)}


# --- augmentations (official data.py, ``augs 3``) -------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: random resized crop, grayscale p=0.2, colour jitter (0.4, 0.4, 0.4, 0.4), flip (official
    ``augs 3``, in its order). It takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomGrayscale(p=0.2),
        v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- the label step: optimal transport by Sinkhorn-Knopp ------------------------------------------


@torch.no_grad()
def sinkhorn_labels(log_p: torch.Tensor, lamb: float, tolerance: float = 0.1, max_iterations: int = 10000) -> torch.Tensor:
    """Labels (N,) of the equal-partition transport of N images to K labels with cost -log P. log_p: (N, K)
    log-probabilities of one head. Q = diag(r) P^lambda diag(c) with r = (1/K) / (P^lambda c) and
    c = (1/N) / (r^T P^lambda) alternated from c = 1/N until sum_i |c_i / c_i' - 1| < tolerance (checked
    every 10 iterations, official ``optimize_L_sk``); the label of image i is argmax_y Q_yi."""
    n, k = log_p.shape
    a = lamb * log_p.double()
    a = a - a.max(dim=1, keepdim=True).values  # a per-image factor, absorbed by c
    p = a.exp().T  # (K, N), P^lambda up to column scales
    c = torch.full((n, 1), 1.0 / n, dtype=p.dtype, device=p.device)
    for it in range(max_iterations):
        r = (1.0 / k) / (p @ c)  # (K, 1)
        c_new = (1.0 / n) / (r.T @ p).T  # (N, 1)
        done = it % 10 == 0 and float((c / c_new - 1).abs().sum()) < tolerance
        c = c_new
        if done:
            break
    q = p * c.T * r  # (K, N) = diag(r) P diag(c)
    return q.argmax(dim=0)  # (N,)


def label_times(epochs: float, num_samples: int, num_opts: int) -> list[float]:
    """The official optimisation times in samples seen, (epochs + 1.01) N t^2 for t on a grid of num_opts
    points in [0, 1], in increasing order."""
    return [(epochs + 1.01) * num_samples * (i / max(1, num_opts - 1)) ** 2 for i in range(num_opts)]


def label_epochs(epochs: int, num_opts: int) -> set[int]:
    """The epochs at whose start the labels are re-optimised: the first epoch boundary at or after each
    official time (the first, at time 0, comes after the random initial labels, as in the official
    code's first step)."""
    return {math.ceil(t) for t in label_times(epochs, 1, num_opts) if math.ceil(t) < epochs}


def sela_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """E(p, q) with hard labels, the mean over heads of the cross-entropy: logits H x (N, K), labels (H, N)."""
    return torch.stack([F.cross_entropy(s.float(), y) for s, y in zip(logits, labels)]).mean()


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# --- model ----------------------------------------------------------------------------------------


class SeLa(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(feature_dim, cfg.num_clusters) for _ in range(cfg.num_heads))
        self.register_buffer("labels", torch.zeros(cfg.num_heads, 0, dtype=torch.long))  # (H, N), set by setup

    def setup(self, num_samples: int, num_classes: int) -> None:
        """A random equal partition of the training set for every head (official: ``i % K``, shuffled),
        from a fixed generator so that every rank starts from the same labels."""
        if num_samples < self.cfg.num_clusters:
            raise ValueError(f"num_clusters {self.cfg.num_clusters} is above the {num_samples} training images")
        g = torch.Generator().manual_seed(0)
        base = torch.arange(num_samples) % self.cfg.num_clusters
        labels = torch.stack([base[torch.randperm(num_samples, generator=g)] for _ in range(self.cfg.num_heads)])
        self.labels = labels.to(self.labels.device)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        if self.labels.shape[1] == 0:
            raise RuntimeError("SeLa has no labels yet: setup(num_samples, num_classes) must run before the first step")
        h = self.backbone(x)  # (N, D)
        logits = [head(h) for head in self.heads]  # H x (N, K)
        labels = self.labels[:, batch["index"]]  # (H, N)
        loss = sela_loss(logits, labels)
        with torch.no_grad():
            acc = (logits[0].argmax(dim=1) == labels[0]).float().mean()
        return {"loss": loss, "label_acc": acc}

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """At the epochs of the official schedule (``label_epochs``): each head's log-probabilities of the
        whole training set, then its labels by Sinkhorn-Knopp."""
        cfg = self.cfg
        if epoch not in label_epochs(total_epochs, cfg.num_label_opts):
            return
        device = self.labels.device
        h = features().to(device)  # (N, D)
        new = torch.stack([
            sinkhorn_labels(F.log_softmax(head(h).float(), dim=1), cfg.lamb, cfg.sinkhorn_tolerance,
                            cfg.sinkhorn_max_iterations) for head in self.heads])  # (H, N)
        if _world()[0] > 1:  # one labelling for all ranks
            dist.broadcast(new, src=0)
        self.labels.copy_(new)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features, before the heads."""
        return self.backbone(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The first head's predicted label of each image, (N,)."""
        return self.heads[0](self.backbone(x)).argmax(dim=1)


MODEL = SeLa


if __name__ == "__main__":
    log_p = F.log_softmax(torch.randn(12, 3) * 3, dim=1)
    labels = sinkhorn_labels(log_p, 25.0)
    print("labels per cluster:", torch.bincount(labels, minlength=3).tolist(), "(equal partition: 4 each)")
