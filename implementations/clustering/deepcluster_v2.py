"""DeepCluster-v2 — Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments". NeurIPS 2020, arXiv:2006.09882 (the paper that introduces
SwAV also revisits DeepCluster with its training improvements). Catalog id: ``deepcluster-v2``.
Official code: https://github.com/facebookresearch/swav (``main_deepclusterv2.py``,
``scripts/deepclusterv2_800ep_pretrain.sh``).

DeepCluster (Caron et al. 2018: implementations/clustering/deepcluster.py) with the changes that make it
train like SwAV: an MLP projection head to l2-normalised embeddings z, multi-crop, and, instead of a
classifier drawn afresh after every clustering, prototypes that *are* the cluster centroids, so nothing
has to be re-learnt between clusterings. At the start of every epoch a spherical k-means clusters a
memory of the embeddings of the two global crops of every image (each image's from the last step it was
in, the previous epoch), for H sets of prototypes C_h (K_h unit rows each; head h clusters the memory
of global crop h mod 2):

    y_{h,n} = argmax_k  c_{h,k}^T m_{h mod 2, n},     c_{h,k} = normalize(mean of the m assigned to k),

10 Lloyd iterations from K_h random memory entries, then one last assignment. During the epoch every
crop v of image n (2 global, 6 local) predicts the pseudo-labels of its image with every head:

    L = 1/H sum_h  1/(V N) sum_{n, v}  -log softmax_k( c_{h,k}^T z_{v,n} / tau )[y_{h,n}],   tau = 0.1.

Collapse: the targets are hard k-means assignments of the whole data set, fixed during the epoch and
without gradient; k-means initialised from K distinct embeddings cannot put every image in one cluster
while the embeddings differ, and the prototypes are not trained (below), so the network cannot make a
few prototypes absorb every image. Empty clusters keep their previous centroid (official: only the
non-empty ones are updated); they are rare with K_h well below N.

Prototypes: the official run freezes the prototypes' gradients for ``freeze_prototypes_niters 300000``
iterations, more than the 800 epochs x 312 iterations of the whole run, so they only ever change by
being overwritten with the centroids: here they are a buffer, not parameters.

Distributed: the loss is per sample (DDP's gradient averaging gives the global batch's). The memory is
indexed by image and kept identical on every rank: each step writes the all-gathered embeddings at the
all-gathered indices. The k-means then runs on the same memory with the same generator on every rank,
so every rank holds the same prototypes and pseudo-labels (the official code shards the memory and
all-reduces the k-means sums, which gives the same clustering).

Deviations:
- the memory is filled before the first epoch from one pass over the training set with the evaluation
  transform (``features(encode)``), not with the training crops (official ``init_memory``); later
  epochs use the training crops, as the official code does;
- the memory is indexed by image (official: by position in the rank's loader, with the image index
  stored beside it): the same content, and a state every rank shares so a checkpoint resumes any;
- the harness's schedule: a linear warm-up from 0 (official: from ``start_warmup`` 0.3) and a cosine to
  0 (official: to ``final_lr`` 0.0048); biases and BN parameters get no weight decay and no LARS
  adaptation (official: LARC on every parameter);
- crops are resized bilinearly so that they run batched on the device, and the blur is a Gaussian
  kernel of 10% of the crop's side, dropped below 64 px (as in the SwAV file).
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
    num_prototypes: tuple[int, ...] = (3000, 3000, 3000)
    """K_h of each of the H heads (official ``--nmb_prototypes 3000 3000 3000``)."""
    proj_hidden_dim: int = 2048
    """Hidden width of the projection head, Linear-BN-ReLU-Linear (official ``hidden_mlp`` 2048)."""
    proj_dim: int = 128
    """The embedding z, l2-normalised (official ``--feat_dim 128``)."""
    temperature: float = 0.1
    """tau of the loss's softmax (official ``--temperature 0.1``)."""
    kmeans_iterations: int = 10
    """Lloyd iterations of each spherical k-means (official ``cluster_memory``: ``nmb_kmeans_iters=10``)."""
    crops_for_assign: tuple[int, ...] = (0, 1)
    """The crops whose embeddings fill the memory: the two global ones (official ``--crops_for_assign 0 1``)."""
    n_local_crops: int = 6
    """Low-resolution crops (official ``--nmb_crops 2 6``)."""
    global_crop_scale: tuple[float, float] = (0.14, 1.0)
    """Area range of the global crops (official ``--min_scale_crops 0.14``, ``--max_scale_crops 1.``)."""
    local_crop_scale: tuple[float, float] = (0.05, 0.14)
    """Area range of the local crops (official ``--min_scale_crops 0.05``, ``--max_scale_crops 0.14``)."""
    local_crop_ratio: float = 96 / 224
    """Side of a local crop over a global one (official ``--size_crops 224 96``)."""
    optimizer: str = "lars"
    """SGD with LARC, trust coefficient 0.001 (official ``main_deepclusterv2.py``)."""
    base_lr: float = 0.3
    """4.8 at batch 4096, i.e. 0.3 per 256 images, then cosine (official deepclusterv2_800ep_pretrain.sh)."""
    weight_decay: float = 1e-6
    """Official ``--wd 0.000001``."""
    momentum: float = 0.9
    """SGD momentum (official ``main_deepclusterv2.py``)."""
    warmup_epochs: int = 10
    """Linear warm-up (official ``--warmup_epochs 10``)."""
    epochs: int = 800
    """Official deepclusterv2_800ep_pretrain.sh: 75.2% ImageNet linear top-1 with ResNet-50 (official README)."""
    batch_size: int = 4096
    """64 images on each of 64 GPUs (official deepclusterv2_800ep_pretrain.sh)."""
    sync_batchnorm: bool = True
    """Official ``--sync_bn apex``."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - num_prototypes (100, 100, 100): ten per class (3000 are three per ImageNet class; 3000 > 1,437 images);
# - proj_hidden_dim 512, proj_dim 64, n_local_crops 4: heads and crops sized to the small CNN's 256-d
#   features; a 16-px local crop costs a quarter of a global one;
# - LARS at base_lr 0.6 per 256 without warm-up, as the SwAV file's small preset;
# - global_crop_scale (0.3, 1), local_crop_scale (0.14, 0.3): 5% of an 8x8 digit upscaled to 32 px is a
#   blob.
PRESETS = {
    "small": dict(num_prototypes=(100, 100, 100), proj_hidden_dim=512, proj_dim=64, n_local_crops=4, base_lr=0.6,
                  warmup_epochs=0, epochs=15, global_crop_scale=(0.3, 1.0), local_crop_scale=(0.14, 0.3)),
}


# --- augmentations (official multicropdataset.py, as SwAV's) ---------------------------------------


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


def local_crop_size(cfg: Config, image_size: int) -> int:
    """The local crops' side: the 96/224 ratio rounded to a multiple of 8 (96 is one: six ViT-S/16 patches);
    16 px at 32 px, i.e. four 4-px patches, 2x2 after three poolings."""
    return max(8, 8 * round(image_size * cfg.local_crop_ratio / 8))


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


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# --- spherical k-means and the loss ---------------------------------------------------------------


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the unit rows x (N, D) by cosine similarity (official ``cluster_memory``): k distinct rows
    drawn with ``generator`` start as centroids; each iteration assigns every row to its most similar
    centroid and replaces each non-empty cluster's centroid by the normalised mean of its rows (an empty
    one keeps its centroid); a last assignment follows. Returns (labels (N,), unit centroids (k, D))."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means of {n} embeddings into {k} clusters: k must be between 1 and the number of embeddings")
    centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()  # (k, D)
    for _ in range(iterations):
        labels = (x @ centroids.T).argmax(dim=1)  # (N,) E step
        counts = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (k, D)
        full = counts > 0
        centroids[full] = F.normalize(sums[full] / counts[full, None].to(x.dtype), dim=1)  # M step
    return (x @ centroids.T).argmax(dim=1), centroids


def deepcluster_v2_loss(scores: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """The loss above: scores H x (V N, K_h), z^T C_h of every crop (views stacked view by view); labels
    H x (N,), the heads' pseudo-labels of the images. The cross-entropy of softmax(scores / tau) against
    the image's label, over every crop, averaged over crops and images, then over heads."""
    total = 0.0
    for s, y in zip(scores, labels):
        v = len(s) // len(y)
        total = total + F.cross_entropy(s.float() / temperature, y.repeat(v))
    return total / len(scores)


# --- model ----------------------------------------------------------------------------------------


class DeepClusterV2(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if not cfg.crops_for_assign or not all(0 <= i < 2 + cfg.n_local_crops for i in cfg.crops_for_assign):
            raise ValueError(f"crops_for_assign {cfg.crops_for_assign}: indices of the {2 + cfg.n_local_crops} views")
        if not cfg.num_prototypes:
            raise ValueError("num_prototypes: at least one head")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, cfg.proj_hidden_dim), nn.BatchNorm1d(cfg.proj_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden_dim, cfg.proj_dim),
        )
        for h, k in enumerate(cfg.num_prototypes):  # unit rows; overwritten by the first clustering
            self.register_buffer(f"prototypes{h}", F.normalize(torch.randn(k, cfg.proj_dim), dim=1))
        a = len(cfg.crops_for_assign)
        self.register_buffer("memory", torch.zeros(a, 0, cfg.proj_dim))  # (A, N, D), sized by setup
        self.register_buffer("assignments", torch.full((len(cfg.num_prototypes), 0), -1, dtype=torch.long))  # (H, N)

    def setup(self, num_samples: int, num_classes: int) -> None:
        """A memory slot and a pseudo-label per training image and head."""
        if num_samples < max(self.cfg.num_prototypes):
            raise ValueError(f"num_prototypes {max(self.cfg.num_prototypes)} is above the {num_samples} training images")
        dev = self.memory.device
        self.memory = torch.zeros(len(self.cfg.crops_for_assign), num_samples, self.cfg.proj_dim, device=dev)
        self.assignments = torch.full((len(self.cfg.num_prototypes), num_samples), -1, dtype=torch.long, device=dev)

    def prototypes(self) -> list[torch.Tensor]:
        """The H prototype matrices (K_h, D)."""
        return [getattr(self, f"prototypes{h}") for h in range(len(self.cfg.num_prototypes))]

    def _embed_z(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(encode(self.backbone, x)), dim=1)  # (N, D)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        views = batch["views"]  # 2 global (N, C, H, W), then M local (N, C, h, w)
        idx = batch["index"]
        n = len(views[0])
        labels = self.assignments[:, idx]  # (H, N)
        if labels.shape[1] == 0 or bool((labels < 0).any()):
            raise RuntimeError("DeepCluster-v2 has no pseudo-labels yet: setup() and on_epoch_start() (the "
                               "clustering) must run before the first step")
        z = F.normalize(self.projector(multicrop_features(self.backbone, views)), dim=1)  # (V N, D)
        scores = [z @ c.T for c in self.prototypes()]  # H x (V N, K_h)
        loss = deepcluster_v2_loss(scores, list(labels), cfg.temperature)
        with torch.no_grad():  # this step's global crops replace the images' memory entries
            zs = z.detach().float().split(n)
            keys = concat_all_gather(torch.stack([zs[i] for i in cfg.crops_for_assign]).transpose(0, 1).contiguous())
            self.memory[:, concat_all_gather(idx.to(self.memory.device))] = keys.transpose(0, 1)  # (A, N_global, D)
            acc = (scores[0][:n].argmax(dim=1) == labels[0]).float().mean()
        return {"loss": loss, "pseudo_label_acc": acc}

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """Before the first epoch, fill the memory from the whole training set (its z); then, every epoch,
        cluster it: head h's spherical k-means on the memory of crop h mod A sets its prototypes and the
        images' pseudo-labels (official ``cluster_memory``)."""
        cfg = self.cfg
        if epoch == 0:
            z = features(self._embed_z).to(self.memory.device)  # (N, D)
            self.memory.copy_(z.unsqueeze(0).expand_as(self.memory))
        g = torch.Generator().manual_seed(1_000_003 * epoch + 29)  # the same on every rank
        for h, k in enumerate(cfg.num_prototypes):
            labels, centroids = spherical_kmeans(self.memory[h % len(cfg.crops_for_assign)], k, cfg.kmeans_iterations, g)
            getattr(self, f"prototypes{h}").copy_(centroids)
            self.assignments[h] = labels

    def param_groups(self) -> list[dict]:
        """Weight decay and LARS on weights, neither on biases and norm parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        wd = self.cfg.weight_decay
        return [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False},
        ]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (the CLS token of a ViT), without projector."""
        return encode(self.backbone, x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most similar prototype of the first head, (N,): the method's own clustering of x."""
        return (self._embed_z(x) @ self.prototypes0.T).argmax(dim=1)


MODEL = DeepClusterV2


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.cat([torch.randn(50, 3, generator=g) * 0.1 + c for c in torch.eye(3)]), dim=1)
    labels, _ = spherical_kmeans(x, 3, 10, g)
    print("spherical k-means on three directions:", torch.bincount(labels).tolist())
