"""NAT (Noise As Targets) — Bojanowski, Joulin. "Unsupervised Learning by Predicting Noise". ICML 2017,
arXiv:1704.05310. Catalog id: ``noise-as-targets``.
Official code (Lua Torch): https://github.com/facebookresearch/noise-as-targets (``main.lua``, ``main.sh``,
``alexnet.lua``, ``imagenet.lua``, ``hungarian.c``).

Fix, once and before training, n target vectors c_1..c_n drawn uniformly on the unit sphere of R^d (a
Gaussian vector divided by its norm; n = the number of training images, d = 2048: official ``codes =
randn(nimg, dim)``, each row normalised). Train the convnet f_theta, whose output is l2-normalised, to map
the images onto the targets through a one-to-one assignment P (an n x n permutation matrix) that is
optimised jointly (the paper's objective with the square loss, Sec. 3):

    min_theta  min_{P in permutations}  1/(2n) || f_theta(X) - P C ||_F^2
               = 1/(2n) sum_i || z_i - c_{P(i)} ||^2,    z_i = f_theta(x_i) / ||f_theta(x_i)||.

Because the loss is separable over images, both parts are optimised by SGD on mini-batches (Sec. 3.3,
"stochastic batch reassignment"): for a batch B, the images of B may exchange the targets they hold,
and the best exchange is the assignment problem

    max_{sigma permutation of B}  sum_{i in B}  z_i . c_{P(sigma(i))}      (equivalently min sum ||z_i - c||^2,
                                                                          as ||z|| = ||c|| = 1),

solved exactly by the Hungarian algorithm in O(|B|^3); then the gradient step is taken on the new
targets. P is re-optimised only in one epoch out of ``reassign_period`` = 3 (the paper reports every 3
epochs as the best period; official ``-permute 3``: in every batch of the epochs with ``epoch % 3 == 0``,
counting from 0); in the other epochs the targets held are fixed and the loss is plain regression.

Collapse: the targets are fixed, spread uniformly on the sphere, and each is held by exactly one image,
so mapping all images to one point costs about the mean distance between two random targets; the only
way to lower the loss is to give different images different outputs (and images that look alike nearby
targets, which the reassignment lets them trade for).

Distributed: the assignment of the global batch equals that of one process on the whole batch. Every rank
gathers the batch's projected features and sample indices of all ranks (in rank order), solves the same
assignment problem on identical inputs (a deterministic solver on the CPU in float64), and writes the
permuted targets of every sample of the global batch into its assignment buffer, so all ranks keep the
same P. The loss is per sample (each rank's samples against their targets), so DDP's gradient average is
the global batch's. The targets and the initial random P come from fixed generators, alike on every rank.

Deviations:
- any backbone of the harness stands for AlexNet's convolutional part; the official fc6-fc7-fc8 layers
  (4096, 4096, d; BN, ReLU, dropout 0.5 after fc6) are the projection head on its pooled features, and
  ``embed`` returns those pooled features (the paper transfers the conv layers with a new MLP on top);
  with ``sobel`` the backbone's first convolution is rebuilt for the 2 Sobel channels, as in the official
  network (a fixed filter whose gradients are zeroed);
- the official random 224 crop of the image resized to 256 on its short side, with a flip, is a
  ``RandomResizedCrop`` of fixed area (224/256)^2 and aspect ratio 1, so that it runs batched on the
  device: the same crop for square images; a crop of that area (not side) for others. The official
  per-image standardisation (torchnet ``transform.normalize``) is the harness's per-channel Normalize;
- the loss is the mean of (1/2) ||z - c||^2 over the batch; the official ``MSECriterion`` sums
  ||z - c||^2 over the batch at learning rate 0.01, which is the same step per sample as ``base_lr``
  5.12 (0.02 per image) here. The rate stays constant, as in the official SGD engine (``fixed_lr``: no
  cosine decay of the harness);
- the official Hungarian solver works on costs rescaled to integers in [0, 100000] (``hungarian.lua``);
  here the exact float64 costs (``linear_assignment``, a shortest augmenting path solver in torch);
- no ``assign``: NAT's targets are one per image, not clusters, so it has no cluster index of its own
  (the evaluation clusters the embeddings with k-means);
- memory: the n x d targets are a buffer on the training device (1.28M x 2048 floats, 10 GB, for
  ImageNet; the official code keeps them in host memory).
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
    proj_dim: int = 2048
    """d, the dimension of the targets and of the projected features (official main.sh ``-dim 2048``)."""
    proj_hidden_dim: int = 4096
    """Width of the two hidden layers of the head, AlexNet's fc6 and fc7 (official alexnet-specs.lua)."""
    dropout: float = 0.5
    """Dropout after the first hidden layer (official alexnet.lua: ``config.dropout or 0.5``)."""
    reassign_period: int = 3
    """The assignment is re-optimised in every batch of the epochs ``epoch % reassign_period == 0`` (paper:
    every 3 epochs is best; official ``-permute 3``)."""
    sobel: bool = True
    """Fixed Sobel filtering of the grey level in front of the convnet (official main.lua's filter)."""
    crop_scale: tuple[float, float] = ((224 / 256) ** 2, (224 / 256) ** 2)
    """Range of the area of the random square crop: fixed, 224 of the 256 short side (official imagenet.lua)."""
    optimizer: str = "sgd"
    """Plain SGD (official torchnet ``SGDEngine``)."""
    base_lr: float = 5.12
    """Official ``-lr 0.01`` on the batch-summed ||z - c||^2 = 0.02 per image, i.e. 5.12 on the batch mean of
    (1/2) ||z - c||^2 at batch 256; constant (official)."""
    weight_decay: float = 0.0
    """None (official ``SGDEngine``)."""
    momentum: float = 0.0
    """None (official ``SGDEngine``)."""
    warmup_epochs: int = 0
    """No warm-up (official)."""
    epochs: int = 100
    """Official main.sh ``-maxepoch 100``."""
    batch_size: int = 256
    """Official main.lua ``-batch 256``."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - proj_hidden_dim 1024: a 4096-wide head on 256 backbone features is most of a CPU step;
# - proj_dim 128: 1,437 targets (2048 dimensions for 1.28M images on ImageNet);
# otherwise the official recipe (fixed crop, Sobel, plain SGD at a constant rate, reassignment every 3
# epochs). NAT does not beat random init on digits's k-NN. Tried (k-NN top-1, random init 0.858; k-means
# NMI, random init 0.662): this preset, 0.839 / 0.493; + crop_scale (0.3, 1.0), 0.819 / 0.568; the same
# without Sobel, 0.764 / 0.503 (random init 0.839); proj_dim 16, momentum 0.9, base_lr 1.0, 0.761 /
# 0.465; the same with reassign_period 1, 0.808 / 0.460 (loss 0.47); with reassign_period 1 and
# crop_scale (0.3, 1.0) too, 0.706. On 1,437 images the network can fit random targets without grouping
# alike images, which NAT relies on at ImageNet scale (500,000 steps here 330).
PRESETS = {"small": dict(proj_dim=128, proj_hidden_dim=1024, epochs=15)}


# --- augmentations (official imagenet.lua: random 224 crop of the 256-short-side image, flip) -----


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: a random square crop of area in ``crop_scale`` resized to the image size, a horizontal
    flip, normalised (the Sobel filter, when on, is applied in the model). It takes a PIL image or a uint8
    tensor."""
    return [v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(cfg.crop_scale), ratio=(1.0, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- Sobel input (as DeepCluster's, the authors' next paper) ---------------------------------------


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


# --- targets, the assignment problem, the loss ----------------------------------------------------


def sphere_targets(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """(n, d) points uniform on the unit sphere of R^d: standard Gaussian vectors divided by their norms."""
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1).float()


@torch.no_grad()
def linear_assignment(cost: torch.Tensor) -> torch.Tensor:
    """The permutation sigma (n,) minimising sum_i cost[i, sigma[i]] of a square cost (n, n): the Hungarian
    algorithm in its shortest-augmenting-path form (Kuhn-Munkres with Jonker-Volgenant's column reduction
    and row-by-row augmentation, O(n^3)). Dual potentials u (rows) and v (columns) keep every reduced cost
    c_ij - u_i - v_j >= 0 and the matched edges at 0; each free row then grows a Dijkstra tree over the
    columns on reduced costs until it reaches a free column, the potentials are updated and the matching is
    flipped along that path. The per-column relaxations are vectorised; it runs on the CPU in float64, ties
    go to the lowest column index."""
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"linear_assignment takes a square cost matrix, got {tuple(cost.shape)}")
    c = cost.detach().to("cpu", torch.float64)
    inf = float("inf")
    # column reduction: v_j = min_i c_ij (reduced costs >= 0, u = 0); a row that is the minimum of some
    # columns holds the first of them (a tight edge), so that only the other rows need a search
    v, best_row = c.min(dim=0)  # (n,), (n,)
    u = torch.zeros(n, dtype=torch.float64)
    first = torch.full((n,), n, dtype=torch.long).scatter_reduce_(0, best_row, torch.arange(n), "amin")  # (n,)
    col_of = first.tolist()  # col_of[i]: the column row i holds, n while free
    row_of = [-1] * n  # row_of[j]: the row holding column j, -1 while free
    for i, j in enumerate(col_of):
        if j < n:
            row_of[j] = i
    for start in [i for i in range(n) if col_of[i] == n]:
        dist_open = torch.full((n,), inf, dtype=torch.float64)  # tentative path costs of unscanned columns
        closed = torch.zeros(n, dtype=torch.float64)  # +inf on scanned columns, which are never relaxed again
        prev = torch.zeros(n, dtype=torch.long)  # the row from which the best path reaches column j
        dist = {}  # final path cost of each scanned column
        rows, i, d = [start], start, 0.0
        while True:
            reduced = c[i] - v + (d - float(u[i])) + closed  # (n,) path costs through row i
            better = reduced < dist_open
            dist_open = torch.where(better, reduced, dist_open)
            prev = torch.where(better, i, prev)
            j = int(dist_open.argmin())  # the nearest unscanned column
            d = float(dist_open[j])
            dist[j] = d
            closed[j], dist_open[j] = inf, inf
            if row_of[j] < 0:  # a free column: the shortest augmenting path ends here
                break
            i = row_of[j]
            rows.append(i)
        # potentials: tree rows rise and scanned columns fall by how much nearer than d they are
        u[start] += d
        for r in rows[1:]:
            u[r] += d - dist[col_of[r]]
        cols = torch.tensor(list(dist))
        v[cols] -= d - torch.tensor(list(dist.values()), dtype=torch.float64)
        prev_l = prev.tolist()
        while True:  # flip the matching along the path, from its free column back to the start row
            r = prev_l[j]
            row_of[j] = r
            col_of[r], j = j, col_of[r]
            if r == start:
                break
    return torch.tensor(col_of, dtype=torch.long, device=cost.device)


@torch.no_grad()
def reassign(z: torch.Tensor, held: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Stochastic batch reassignment (Sec. 3.3): the batch's images (features z (B, d), unit norm) exchange
    the targets they hold (held (B,) target indices) to maximise sum_i z_i . c_{new_i}, i.e. to minimise the
    batch's square loss. Returns the new target indices (B,), a permutation of ``held``."""
    scores = z.float() @ targets[held].float().T  # (B, B): image i against the target held by image j
    sigma = linear_assignment(-scores)  # (B,)
    return held[sigma]


def nat_loss(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(1/2) ||z_i - c_i||^2 averaged over the batch: z (N, d) l2-normalised features, c (N, d) their targets."""
    return 0.5 * (z.float() - c.float()).pow(2).sum(dim=1).mean()


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# --- model ----------------------------------------------------------------------------------------


class NAT(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        if cfg.sobel:
            replace_input_conv(backbone, 2)
        self.backbone = backbone
        h = cfg.proj_hidden_dim
        self.projector = nn.Sequential(  # official fc6, fc7, fc8 (alexnet.lua ``makeclassifierlayer``)
            nn.Linear(feature_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, cfg.proj_dim),
        )
        self.register_buffer("targets", torch.zeros(0, cfg.proj_dim))  # C (n, d), fixed; set by setup
        self.register_buffer("assignment", torch.zeros(0, dtype=torch.long))  # P (n,): target of image i
        self.register_buffer("reassigning", torch.tensor(True))  # this epoch re-optimises P (epoch 0 does)

    def setup(self, num_samples: int, num_classes: int) -> None:
        """One target per training image on the unit sphere, and a random one-to-one initial assignment
        (official ``label = randperm(nimg)``), from fixed generators: the same on every rank."""
        g = torch.Generator().manual_seed(0)
        device = self.targets.device
        self.targets = sphere_targets(num_samples, self.cfg.proj_dim, g).to(device)
        self.assignment = torch.randperm(num_samples, generator=g).to(device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(sobel(x) if self.cfg.sobel else x)  # (N, D)

    def forward(self, batch: dict) -> dict:
        if len(self.assignment) == 0:
            raise RuntimeError("NAT has no targets yet: setup(num_samples, num_classes) must run before the first step")
        x = batch["views"][0]  # (N, C, H, W)
        index = batch["index"].to(self.assignment.device)  # (N,)
        z = F.normalize(self.projector(self.features(x)).float(), dim=1)  # (N, d), on the unit sphere
        changed = torch.zeros((), device=z.device)
        if self.training and bool(self.reassigning):
            with torch.no_grad():  # the global batch's assignment, the same on every rank
                z_all, index_all = concat_all_gather(z.detach()), concat_all_gather(index)  # (B, d), (B,)
                held = self.assignment[index_all]  # (B,)
                new = reassign(z_all, held, self.targets)
                self.assignment[index_all] = new
                changed = (new != held).float().mean()
        c = self.targets[self.assignment[index]]  # (N, d), no gradient: a buffer
        loss = nat_loss(z, c)
        return {"loss": loss, "reassigned": changed}

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """Re-optimise P in the batches of this epoch when ``epoch % reassign_period == 0`` (official
        ``state.epoch % config.permute == 0``, epochs from 0); no whole-data-set work."""
        self.reassigning.fill_(epoch % self.cfg.reassign_period == 0)

    def param_groups(self) -> list[dict]:
        """One group at a constant rate, no weight decay (the official plain ``SGDEngine``)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": 0.0, "fixed_lr": True}]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features of the (Sobel-filtered) images, before the head."""
        return self.features(x)


MODEL = NAT


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(6, 6, generator=g)
    sigma = linear_assignment(cost)
    print("assignment:", sigma.tolist(), "cost:", round(float(cost[torch.arange(6), sigma].sum()), 4))
