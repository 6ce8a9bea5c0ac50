"""DEC — Xie, Girshick, Farhadi. "Unsupervised Deep Embedding for Clustering Analysis". ICML 2016,
arXiv:1511.06335. Catalog id: ``dec``.
Official code: https://github.com/piiswrong/dec (``dec/dec.py``, ``dec/pretrain.py``; Caffe, with the
``MULTI_T_LOSS`` layer in ``caffe/src/caffe/layers/multi_t_loss_layer.cu``).

Two stages (Sec. 3). Parameter initialisation (Sec. 3.2): a denoising autoencoder is trained to
reconstruct its input from a corrupted copy (x~ = Dropout(x), squared error); its encoder f_theta maps
the data to a 10-d embedding z = f_theta(x), and k-means on the embeddings of the whole data set (20
restarts, the best kept) gives the initial centres mu_j. Clustering (Sec. 3.1): each point is softly
assigned to the centres by a Student's t kernel (Eq. 1, alpha = 1)

    q_ij = (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha+1)/2) / sum_j' (1 + ||z_i - mu_j'||^2 / alpha)^(-(alpha+1)/2),

the assignments are sharpened into a target distribution over the whole data set (Eq. 3)

    p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'),    f_j = sum_i q_ij  (soft cluster frequencies),

and the encoder and the centres descend the KL divergence (Eq. 2)

    L = KL(P || Q) = sum_i sum_j p_ij log(p_ij / q_ij),

with P held fixed between refreshes. The gradients are Eq. 4 (to z_i) and Eq. 5 (to mu_j):

    dL/dz_i  =  (alpha+1)/alpha sum_j (1 + ||z_i - mu_j||^2/alpha)^-1 (p_ij - q_ij)(z_i - mu_j),
    dL/dmu_j = -(alpha+1)/alpha sum_i (1 + ||z_i - mu_j||^2/alpha)^-1 (p_ij - q_ij)(z_i - mu_j).

P is recomputed every T iterations (official ``update_interval``) from q of the whole data set, and the
procedure stops once fewer than tol = 0.1% of the points change their cluster (argmax_j q_ij) between
two refreshes (Sec. 3.1.3, 4.3; official ``DisKmeans``).

Collapse: nothing in KL(P || Q) forbids moving every point to one centre; DEC relies on its start (a
reconstructing encoder, k-means centres) and on the target: squaring sharpens each point towards the
clusters it already prefers (self-training on confident assignments), and dividing by the soft
frequency f_j lowers the target mass of large clusters, so that they do not absorb the others (Sec.
3.1.2). P is a fixed target (no gradient flows through it).

Distributed: the loss is per sample (the mean over the batch of each point's KL), so DDP's gradient
averaging gives the global batch's gradients provided P and the centres are the same on every rank.
Every rank embeds the whole training set in the epoch hook, but with ``broadcast_buffers=False`` each
rank's BatchNorm running statistics differ and so do its embeddings: the k-means centres and the soft
assignments q of the whole set are broadcast from rank 0, and P, the assignments and the changed
fraction are derived from them alike on every rank.

This file, in the harness's one training run: epochs ``0 .. pretrain_epochs - 1`` train the autoencoder
(the harness backbone, then the paper's MLP ``D-500-500-2000-10`` to z, and a mirrored MLP decoder); at
the first epoch after it, ``on_epoch_start`` runs k-means on z of the whole training set and switches to
the clustering stage; from then on the hook refreshes P every ``update_epochs``. The fraction of changed
assignments is logged as ``changed`` and the first epoch at which it falls below ``tol`` is kept in the
``converged_epoch`` buffer. ``embed`` returns the backbone's pooled features (what the harness's k-NN and
k-means evaluate, as for the other clustering files); ``assign`` returns argmax_j q_ij.

Deviations:
- the paper pre-trains a stacked denoising autoencoder layer by layer (each pair 50,000 iterations with
  20% dropout on its input and hidden layer), then fine-tunes the whole autoencoder without dropout
  (100,000 iterations, Sec. 4.3). Here one end-to-end denoising autoencoder trains for
  ``pretrain_epochs``, with 20% dropout on the input pixels and on the MLP's hidden layers throughout;
  layer-wise training of a convolutional backbone has no counterpart in the harness's single run;
- the encoder's first part is any harness backbone (the paper's encoder is the MLP alone, on pixels or
  HOG features). The decoder is the encoder's MLP mirrored (10-2000-500-500) and a linear layer to the
  pixels of the normalised input, average-pooled to ``recon_size`` x ``recon_size``: an MLP decoder works
  for any image size the backbone takes, and its output size does not depend on it;
- weights start from PyTorch's default initialisation: the paper's N(0, 0.01^2) suits one shallow pair at
  a time but makes a 5-layer end-to-end stack vanish;
- the reconstruction loss is the mean squared error per pixel (Caffe's EuclideanLoss: half the sum over
  dimensions, on MNIST pixels scaled by 0.02), and the stage's rate is set by weighting it: the paper's
  0.1 for the autoencoder and 0.01 for the KL stage (both at batch 256) become ``base_lr = 0.01`` and a
  factor ``pretrain_lr_scale = 10`` on the reconstruction loss, the same step for SGD without weight
  decay. Both stages follow the harness's cosine schedule (paper: 0.1 divided by 10 every 20,000
  iterations; then a constant 0.01), and one optimizer carries momentum from one stage to the next (the
  official code restarts Caffe's solver at every refresh);
- P is refreshed at epoch starts, every ``update_epochs`` epochs (default 1: the official code's default
  ``update_interval`` of one pass over the data; its runs use 160 iterations of 256 on MNIST, about 0.6
  of an epoch of 70,000, 40 on STL-10 and 20 on Reuters), because the harness gives the hook the whole
  training set only at epoch starts;
- training does not stop at ``tol``: the harness runs its fixed number of epochs; the changed fraction
  is logged and the epoch at which it first fell below tol is recorded;
- k-means is the torch Lloyd iteration of the DeepCluster file (random data points as initial centroids,
  a fixed number of iterations, empty clusters split) with 20 restarts and the lowest within-cluster sum
  of squares kept, as the official ``KMeans(n_init=20)``; scikit-learn seeds each restart with k-means++;
- every parameter gets a gradient every step, as DDP without ``find_unused_parameters`` needs: the
  centres enter the autoencoder stage's loss and the decoder the KL stage's with weight 0 (the paper
  discards the decoder after pre-training);
- no augmentation, as the paper: the one view is the whole image (a random resized crop of scale 1 and
  ratio 1, i.e. a resize); the denoising corruption is made inside ``forward``.
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
    """k; 0: the data set's number of classes (``setup``), as the paper sets k to the number of
    ground-truth categories (official ``N_class``: 10 for MNIST and STL-10, 4 for Reuters)."""
    hidden_dims: tuple[int, ...] = (500, 500, 2000)
    """Hidden widths of the encoder MLP, d-500-500-2000-10 (Sec. 4.3; official ``write_net``)."""
    embed_dim: int = 10
    """Dimension of the embedding z (Sec. 4.3; official ``dim = 10``)."""
    alpha: float = 1.0
    """Degrees of freedom of the Student's t kernel (Sec. 3.1.1: alpha = 1 for all experiments)."""
    dropout: float = 0.2
    """Dropout rate of the denoising autoencoder's input corruption and hidden layers (Sec. 4.3: 20%)."""
    recon_size: int = 32
    """Side of the reconstruction target: the normalised input average-pooled to recon_size x recon_size
    (not in the paper, see Deviations; 32 keeps 32-px images whole)."""
    pretrain_epochs: int = 366
    """Epochs of the autoencoder stage: the paper's end-to-end fine-tuning, 100,000 iterations of 256
    (Sec. 4.3), is 366 epochs of MNIST's 70,000 images (the layer-wise stage before it has no counterpart)."""
    pretrain_lr_scale: float = 10.0
    """Weight of the reconstruction loss, i.e. the autoencoder stage's rate over the KL stage's: 0.1 / 0.01
    (Sec. 4.3; see Deviations)."""
    update_epochs: int = 1
    """Epochs between two refreshes of the target P (official ``update_interval``, one pass by default;
    see Deviations)."""
    tol: float = 0.001
    """Convergence threshold on the fraction of changed assignments between two refreshes (Sec. 4.3:
    tol = 0.1%; official ``< 0.001*N``)."""
    kmeans_restarts: int = 20
    """k-means runs for the initial centres, the best kept (Sec. 4.3; official ``KMeans(n_init=20)``)."""
    kmeans_iterations: int = 300
    """Lloyd iterations of each run (scikit-learn's default ``max_iter``, which the official code keeps)."""
    optimizer: str = "sgd"
    """SGD with momentum (Sec. 3.1.3; official solver files)."""
    base_lr: float = 0.01
    """The KL stage's constant 0.01 at batch 256 (Sec. 4.3; official ``base_lr: 0.01``)."""
    weight_decay: float = 0.0
    """No weight decay (Sec. 4.3; official ``weight_decay: 0.0000``)."""
    momentum: float = 0.9
    """Official solver files (``momentum: 0.9``, both stages)."""
    warmup_epochs: int = 0
    """No warm-up (official solver files)."""
    epochs: int = 466
    """pretrain_epochs, then 100 epochs of the KL stage: the paper runs it until fewer than tol of the
    assignments change and states no bound (this budget is the file's choice)."""
    batch_size: int = 256
    """Sec. 4.3 and official ``train_batch_size = 256``."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - pretrain_epochs 10: two thirds of the budget for the autoencoder (220 steps; the paper's is 300,000
#   iterations), five epochs (five refreshes of P) of the KL stage;
# - pretrain_lr_scale 30: at the paper's ratio (10, i.e. 0.025 at batch 64 under the cosine) the per-pixel
#   error barely moved in 30 steps (4.59 -> 4.45); 100 reached 1.6 and then rose, 400 diverged; 30 and 60
#   both reached ~1.5 in 60 steps. What was tried, with k-NN of the backbone features (random init 0.839):
#   SGD, scale 30: 0.653 (k-means NMI 0.32, assign NMI 0.06); AdamW at base_lr 4e-3, scale 1: 0.561
#   (assign NMI 0.26). The autoencoder's pooled backbone features fall below random init on digits:
#   the small CNN's global average pooling must carry the whole image to the MLP decoder.
PRESETS = {"small": dict(pretrain_epochs=10, pretrain_lr_scale=30.0, epochs=15)}


# --- augmentations (none: Sec. 4 trains on the raw vectors) ----------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: the whole image at ``image_size`` (a crop of scale 1 and aspect ratio 1, i.e. a resize),
    normalised. It takes a PIL image or a uint8 tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- k-means (from the DeepCluster file) and its restarts -------------------------------------------


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
def kmeans_restarts(x: torch.Tensor, k: int, restarts: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """The centroids (k, D) of the best of ``restarts`` k-means runs on x (N, D): the lowest sum of squared
    distances of the points to their centroids (official ``KMeans(n_init=20)``)."""
    best, best_cost = None, math.inf
    for _ in range(restarts):
        labels, centroids = kmeans(x, k, iterations, generator)
        cost = float(((x - centroids[labels]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = centroids, cost
    return best


# --- the losses -----------------------------------------------------------------------------------


def soft_assignment(z: torch.Tensor, centres: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """log q (N, K) of Eq. 1: the Student's t kernel of the embeddings z (N, d) around the centres (K, d),
    normalised over the centres (in log space, so that far points do not underflow)."""
    dist2 = (z[:, None, :] - centres[None, :, :]).pow(2).sum(dim=2)  # (N, K) ||z_i - mu_j||^2
    log_kernel = -(alpha + 1) / 2 * torch.log1p(dist2 / alpha)  # (N, K)
    return log_kernel.log_softmax(dim=1)


@torch.no_grad()
def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """P (N, K) of Eq. 3 from q (N, K) of the whole data set: q^2 divided by the soft cluster frequencies
    f_j = sum_i q_ij, renormalised over the clusters."""
    f = q.sum(dim=0)  # (K,)
    w = q.pow(2) / f  # (N, K)
    return w / w.sum(dim=1, keepdim=True)


def dec_loss(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Eq. 2, KL(P || Q) = sum_j p_ij log(p_ij / q_ij) for each point, the mean over the batch (official
    ``MULTI_T_LOSS``: ``loss / num``). log_q (N, K) with gradient, p (N, K) fixed; 0 log 0 = 0."""
    return F.kl_div(log_q, p, reduction="batchmean")


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean squared error of the decoder's output recon (N, C r^2) against the clean normalised input
    x (N, C, H, W) average-pooled to r x r (r = size)."""
    target = F.adaptive_avg_pool2d(x.float(), size).flatten(1)  # (N, C r^2)
    return F.mse_loss(recon.float(), target)


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# --- model ----------------------------------------------------------------------------------------


def _mlp(layers: nn.ModuleList, h: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    """Linear layers with ReLU (and dropout, in the autoencoder stage) between them; the last is linear
    (Sec. 3.2: the embedding and the reconstruction of zero-mean data need the full range)."""
    for i, layer in enumerate(layers):
        h = layer(h)
        if i < len(layers) - 1:
            h = F.dropout(F.relu(h), dropout, training)
    return h


class DEC(nn.Module):
    CHANNELS = 3  # the harness's images are RGB

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        dims = (feature_dim, *cfg.hidden_dims, cfg.embed_dim)
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        dims = (cfg.embed_dim, *reversed(cfg.hidden_dims), self.CHANNELS * cfg.recon_size**2)
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        k = cfg.num_clusters or 10  # 0: set by setup to the number of classes
        self.centres = nn.Parameter(self._placeholder_centres(k))  # mu (K, d)
        self.register_buffer("target", torch.zeros(0, k))  # P (N, K), set by setup and the epoch hook
        self.register_buffer("assignments", torch.zeros(0, dtype=torch.long))  # argmax_j q_ij at the last refresh
        self.register_buffer("clustering", torch.tensor(False))  # past the autoencoder stage
        self.register_buffer("changed", torch.tensor(1.0))  # fraction of assignments changed at the last refresh
        self.register_buffer("converged_epoch", torch.tensor(-1))  # first refresh with changed < tol

    def _placeholder_centres(self, k: int) -> torch.Tensor:
        """Centres until k-means replaces them (the random-init baseline's): N(0, 1) from a fixed seed, the
        same on every rank."""
        return torch.randn(k, self.cfg.embed_dim, generator=torch.Generator().manual_seed(0))

    def setup(self, num_samples: int, num_classes: int) -> None:
        """k centres (one per class unless ``num_clusters`` says otherwise) and room for P and the
        assignments of every training image."""
        k = self.cfg.num_clusters or num_classes
        if num_samples < k:
            raise ValueError(f"{k} clusters for {num_samples} training images")
        device = self.centres.device
        if k != len(self.centres):
            self.centres = nn.Parameter(self._placeholder_centres(k).to(device))
        self.target = torch.zeros(num_samples, k, device=device)
        self.assignments = torch.full((num_samples,), -1, dtype=torch.long, device=device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = f_theta(x) (N, d): the backbone, then the MLP, without corruption."""
        return _mlp(self.encoder, self.backbone(x), 0.0, False)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x = batch["views"][0]  # (N, C, H, W)
        if not bool(self.clustering):  # the autoencoder stage (Sec. 3.2)
            x_tilde = F.dropout(x, cfg.dropout, self.training)  # the corrupted input
            z = _mlp(self.encoder, self.backbone(x_tilde), cfg.dropout, self.training)  # (N, d)
            recon = _mlp(self.decoder, z, cfg.dropout, self.training)  # (N, C r^2)
            rec = reconstruction_loss(recon, x, cfg.recon_size)
            loss = cfg.pretrain_lr_scale * rec + 0.0 * self.centres.sum()  # the centres: a zero gradient (DDP)
            return {"loss": loss, "reconstruction": rec.detach()}
        if len(self.target) == 0:
            raise RuntimeError("DEC has no target distribution: setup() must run before the epoch hook")
        z = self.encode(x).float()  # (N, d)
        log_q = soft_assignment(z, self.centres.float(), cfg.alpha)  # (N, K), Eq. 1
        p = self.target[batch["index"]]  # (N, K), Eq. 3 of the last refresh
        kl = dec_loss(log_q, p)  # Eq. 2
        unused = sum(w.sum() for w in self.decoder.parameters())  # the decoder: a zero gradient (DDP)
        return {"loss": kl + 0.0 * unused, "kl": kl.detach(), "changed": self.changed}

    @torch.no_grad()
    def soft_assignments(self, z: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """q (N, K) of the embeddings z (N, d), in chunks of rows."""
        c = self.centres.float()
        return torch.cat([soft_assignment(z[i : i + chunk].float(), c, self.cfg.alpha).exp() for i in range(0, len(z), chunk)])

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """At epoch ``pretrain_epochs``: k-means on z of the whole training set gives the centres and the
        clustering stage begins; then, every ``update_epochs``, q of the whole set gives a new P, the
        assignments and the fraction of them that changed."""
        cfg = self.cfg
        if epoch < cfg.pretrain_epochs:
            return
        start = not bool(self.clustering)
        if not start and (epoch - cfg.pretrain_epochs) % cfg.update_epochs:
            return
        device = self.centres.device
        world, _ = _world()
        z = features(self.encode).to(device).float()  # (N, d)
        if start:
            g = torch.Generator().manual_seed(0)
            centres = kmeans_restarts(z, len(self.centres), cfg.kmeans_restarts, cfg.kmeans_iterations, g)
            if world > 1:  # rank 0's embeddings (each rank's BN statistics differ)
                dist.broadcast(centres, src=0)
            self.centres.copy_(centres)
            self.clustering.fill_(True)
        q = self.soft_assignments(z)  # (N, K)
        if world > 1:  # one target for all ranks
            dist.broadcast(q, src=0)
        self.target.copy_(target_distribution(q))  # Eq. 3
        new = q.argmax(dim=1)  # (N,)
        changed = (new != self.assignments).float().mean()  # 1 at the first refresh (no assignments before)
        self.assignments.copy_(new)
        self.changed.copy_(changed)
        if float(changed) < cfg.tol and int(self.converged_epoch) < 0:  # Sec. 3.1.3's stopping point
            self.converged_epoch.fill_(epoch)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (N, D), before the MLP to z."""
        return self.backbone(x)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_j q_ij of each image, (N,)."""
        return soft_assignment(self.encode(x).float(), self.centres.float(), self.cfg.alpha).argmax(dim=1)


MODEL = DEC


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    q = soft_assignment(torch.randn(6, 2, generator=g), torch.randn(3, 2, generator=g)).exp()
    print("q:", q.numpy().round(2), "\nP:", target_distribution(q).numpy().round(2), sep="\n")
