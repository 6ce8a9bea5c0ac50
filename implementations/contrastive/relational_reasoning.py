"""Self-supervised relational reasoning — Patacchiola, Storkey. "Self-Supervised Relational Reasoning for
Representation Learning". NeurIPS 2020, arXiv:2006.05849. Catalog id: ``relational-reasoning``. Official code:
https://github.com/mpatacchiola/self-supervised-relational-reasoning (``methods/relationnet.py``: the
method with the focal loss; ``essential_script.py``: the same pairing with a plain BCE; ``datamanager.py``:
the views).

A learnable relation head, not a fixed similarity, decides whether two views show the same image. Each of
the N images of the batch gets K augmentations; the backbone f (no projector) maps all K N views, in one
batch, to z = f(x) (D-d). Every unordered pair of augmentations i < j (P = K(K - 1) / 2 pairs, indexed
p = 0 .. P - 1 in the row-major order of (i, j)) gives, for every image n,

    a positive (intra-reasoning):  a(z_i^n, z_j^n),              target t = 1
    a negative (inter-reasoning):  a(z_i^n, z_j^m),  m = (n - s_p) mod N,   target t = 0

where the partner m comes from rolling augmentation j's rows of the batch by s_p = 1 + (p mod (N - 1))
(the official ``torch.roll`` with a shift counter that starts at 1, grows by one per augmentation pair and
restarts at 1 before reaching N: a shift in 1 .. N - 1 never pairs an image with itself, and successive
pairs see different partners). a is the aggregation, concatenation by default (the paper's choice; the
code's ``sum``, ``mean`` and ``max`` are available); the relation head r_phi (Linear(2D, 256), BatchNorm1d,
LeakyReLU, Linear(256, 1), the code's ``relation_module``) turns each pair into a logit y. With
p_t = sigmoid(y) for t = 1 and 1 - sigmoid(y) for t = 0, the loss is the sigmoid focal loss (Lin et al.
2017; the code's ``FocalLoss(gamma=2.0, alpha=0.5)``), averaged over all 2 P N pairs:

    FL(y, t) = -alpha_t (1 - p_t)^gamma log p_t,    alpha_t = alpha (t = 1), 1 - alpha (t = 0),
    L = 1 / (2 P N) sum_n sum_p [FL(r_phi(a(z_i^n, z_j^n)), 1) + FL(r_phi(a(z_i^n, z_j^m)), 0)].

The focal factor (1 - p_t)^gamma (gamma = 2) shrinks the terms of pairs the head already classifies well,
so the gradient concentrates on hard positives (strongly augmented views of one image) and hard negatives
(look-alike images); alpha = 0.5 weighs the two classes alike (it halves the loss). gamma = 0 is the
Bernoulli log-likelihood (BCE) of ``essential_script.py``, times alpha.

The pretext target is generated, not drawn: which pairs are positive and which negative is a fixed function
of the batch layout (the shifts restart at 1 in every batch, as the official ``aggregate``), so ``forward``
takes nothing from the RNG; the randomness is in the K views, which the harness makes from the global torch
RNG that it reseeds every step from (seed, step, rank), so runs resume exactly.

Collapse: the negatives. A constant backbone gives every positive and every negative the same input, so the
head can do no better than one logit for both classes; by the symmetry of FL in (y, t) <-> (-y, 1 - t), the
best is y = 0, a loss of alpha 0.5^gamma log 2 (0.087 at the defaults), which only features that tell images
apart can lower. Shortcut: the head must not be too strong, or it separates the pairs without the backbone
learning anything (official notebook); the paper's head is a one-hidden-layer MLP on the backbone's pooled
features, and the same-image pairs come from heavy augmentations (crops down to 8% of the area, strong
colour jitter), so low-level cues such as colour histograms do not identify an image.

``embed`` returns the backbone's pooled features, those the paper's linear evaluation trains on (the flattened
output of the last global pooling, ``feature_extractor``).

Distributed: the negatives pair images across the GLOBAL batch. The features are all-gathered with their
gradient (``gather_with_grad``); each rank builds the pairs whose first element is one of its own images
(global row n = rank offset + local row), its partner taken from the gathered rows rolled by s_p over N_global,
and averages over its 2 P N_local pairs. The ranks hold equal shards, so the mean over ranks is the loss of
one process on the concatenated batch, and DDP's averaging of the gradients (summed across ranks by the
gather's backward) gives that process's gradient. The relation head's BatchNorm1d normalises each rank's
pairs (``sync_batchnorm`` converts it to SyncBatchNorm on CUDA); the shared torchrun check strips BN.

Deviations:
- The backbone is the harness's (small CNN or CIFAR ResNet-18 at 32 px); the paper's are Conv-4 and
  ResNet-32/56 at 32 px (CIFAR), ResNet-34 at 64/96 px. The view recipe is the paper's at 32 px, so the crop
  scale (0.08 - 1 of the area) and the jitter need no rescaling; at other sizes crops are taken at the image
  size of the data set, as the code's ``RandomResizedCrop(size=side)``.
- Pairs are listed positives first, then negatives (the code interleaves them per augmentation pair): the
  mean loss and the head's BN statistics do not depend on the order.
- The shift restarts on the global batch size N_global (the code: the one-GPU batch size); on one process
  they coincide.
- A batch of one image has no negative: refused (the code would pair the image with itself).
- Optimiser: Adam (the harness's AdamW with no weight decay, which is Adam) at lr 1e-3 for backbone and
  head, no schedule (``constant_lr``: both groups at the peak rate), as the official code. The harness
  scales the rate with the batch (base_lr x batch / 256), which gives the paper's 1e-3 at its batch of 64.
- The paper's text (the equation number of the objective, where it states the focal weighting) could not be
  read here: the pairing, the head and the focal loss follow the official code, K, the batch and the epochs
  its README and notebook.

Cost: the backbone runs on K N views (2,048 at the paper's K = 32, N = 64), the head on 2 P N = N K (K - 1)
pairs (63,488: a (63,488, 2D) input); the time grows with K^2 (official README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

AGGREGATIONS = ("cat", "sum", "mean", "max")


@dataclass(frozen=True)
class Config:
    num_augmentations: int = 32
    """K, augmentations per image (official README and notebook: "K=32 for CIFAR-10 and CIFAR-100 with
    mini-batch 64"; ``train_unsupervised.py --K 32``; the essential script uses 4 for a quick check)."""
    aggregation: str = "cat"
    """a(z_i, z_j): ``"cat"`` concatenation (the paper's choice, the code's default ``--aggregation cat``,
    "the most effective" per the notebook), or the code's ``"sum"``, ``"mean"``, ``"max"``."""
    relation_hidden_dim: int = 256
    """Hidden units of the relation head (the code's ``relation_module``: Linear(2D, 256), BN, LeakyReLU,
    Linear(256, 1))."""
    leaky_slope: float = 0.01
    """Negative slope of the head's LeakyReLU (the code's ``nn.LeakyReLU()``, PyTorch's default 0.01)."""
    focal_gamma: float = 2.0
    """gamma, the exponent of the focal factor (1 - p_t)^gamma (the code: ``FocalLoss(gamma=2.0, ...)``,
    "reccommended value for gamma: 2.0"); 0 gives the BCE of the essential script (times alpha)."""
    focal_alpha: float = 0.5
    """alpha, the weight of the positives (1 - alpha of the negatives) (the code: ``alpha=0.5``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (``datamanager.py``: scale (0.08, 1.0))."""
    jitter_strength: float = 0.8
    """Brightness, contrast and saturation of the colour jitter (``datamanager.py``: 0.8 each, hue 0.2)."""
    jitter_prob: float = 0.8
    """Probability of the colour jitter (``datamanager.py``: ``RandomApply([color_jitter], p=0.8)``)."""
    gray_prob: float = 0.2
    """Probability of grayscale (``datamanager.py``: ``RandomGrayscale(p=0.2)``)."""
    optimizer: str = "adamw"
    """Adam (official ``Adam`` over backbone and head); AdamW with weight decay 0 is Adam."""
    base_lr: float = 0.004
    """lr = base_lr x batch / 256: 1e-3 at the paper's batch of 64 (official ``Adam(..., lr=0.001)`` for
    both groups)."""
    weight_decay: float = 0.0
    """None in the official optimizer."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's defaults (the official optimizer sets none)."""
    constant_lr: bool = True
    """Both groups at the peak rate throughout, no warm-up or decay (the official code has no scheduler)."""
    warmup_epochs: int = 0
    """No warm-up (official code)."""
    epochs: int = 200
    """200 for CIFAR-10/100, tiny-ImageNet and SlimageNet64, 300 for STL-10 (official README)."""
    batch_size: int = 64
    """Mini-batch 64 with K = 32 (official README: 128 for the other methods, 64 for this one)."""
    sync_batchnorm: bool = False
    """The official code trains on one GPU: BN statistics per device."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 32 px, 330 steps at batch 64):
# - num_augmentations 4: the essential script's K. K = 32 runs the backbone on 2,048 views a step and the head
#   on 63,488 pairs, about 8x the backbone time and 80x the pairs of K = 4 (6 augmentation pairs an image);
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets).
# Everything else is the paper's (Adam at 1e-3, constant; focal gamma 2, alpha 0.5). `selfsup train
# relational-reasoning` with this preset: k-NN 0.867 (random init 0.839), linear 0.981 (0.986), pair accuracy
# 0.50 -> 0.83 over the 330 steps.
PRESETS = {"small": dict(num_augmentations=4, min_scale=0.4)}


# --- augmentations (official datamanager.py: the same recipe for every one of the K views) ------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """K = ``num_augmentations`` views from one distribution: random resized crop (scale 0.08-1, ratio
    3/4-4/3, bilinear), flip, colour jitter (0.8, 0.8, 0.8, 0.2) with p = 0.8, grayscale p = 0.2
    (``datamanager.py``, in its order). Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""
    s = cfg.jitter_strength
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(s, s, s, 0.2)], p=cfg.jitter_prob),
        v2.RandomGrayscale(p=cfg.gray_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]
    return [v2.Compose(steps) for _ in range(cfg.num_augmentations)]


# --- the relation head --------------------------------------------------------------------------------


def relation_head(in_dim: int, hidden_dim: int, leaky_slope: float) -> nn.Sequential:
    """r_phi: Linear(in, 256), BatchNorm1d, LeakyReLU, Linear(256, 1), a logit per pair (the code's
    ``relation_module``)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(leaky_slope),
        nn.Linear(hidden_dim, 1),
    )


# --- pairs and loss -------------------------------------------------------------------------------


# copied from simclr.py, which the contract test keeps identical
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


# copied from simclr.py, which the contract test keeps identical
def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(concatenation of x over ranks, offset of this rank's rows); x itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(_GatherWithGrad.apply(x)), dist.get_rank() * x.shape[0]


def augmentation_pairs(k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j), each (P,), P = K (K - 1) / 2: every pair of augmentations i < j in the code's loop order
    (i outer, j inner)."""
    ij = torch.triu_indices(k, k, offset=1, device=device)  # (2, P), row-major
    return ij[0], ij[1]


def roll_shifts(num_pairs: int, n: int, device=None) -> torch.Tensor:
    """s_p = 1 + (p mod (n - 1)), (P,): the code's shift counter (starts at 1, + 1 per augmentation pair,
    back to 1 when it reaches the batch size n), so that no negative pairs an image with itself."""
    return 1 + torch.arange(num_pairs, device=device) % (n - 1)


def aggregate(za: torch.Tensor, zb: torch.Tensor, how: str) -> torch.Tensor:
    """a(z_a, z_b) on (..., D) pairs: concatenation (..., 2D), or the sum, mean, elementwise max (..., D)."""
    if how == "cat":
        return torch.cat([za, zb], dim=-1)
    if how == "sum":
        return za + zb
    if how == "mean":
        return (za + zb) / 2
    if how == "max":
        return torch.maximum(za, zb)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {how!r}")


def relation_pairs(z: torch.Tensor, how: str = "cat") -> torch.Tensor:
    """The aggregated pairs of this rank's images, (2, P, N, A): [0] the positives a(z_i^n, z_j^n), [1] the
    negatives a(z_i^n, z_j^m), m = (n - s_p) mod N_global for the GLOBAL row n (a roll of augmentation j's
    rows of the global batch by s_p). z: (N, K, D) this rank's features, K augmentations per image; the
    partners come from the rows of all ranks, gathered with their gradient."""
    n, k, _ = z.shape
    everyone, offset = gather_with_grad(z)  # (N_global, K, D)
    n_global = everyone.shape[0]
    if n_global < 2:
        raise ValueError("relational reasoning: a batch of one image has no negative pair")
    i, j = augmentation_pairs(k, z.device)  # (P,) each
    s = roll_shifts(len(i), n_global, z.device)  # (P,)
    rows = offset + torch.arange(n, device=z.device)  # (N,) global rows of this rank's images
    partner = (rows[None, :] - s[:, None]) % n_global  # (P, N): torch.roll(x, s)[n] = x[n - s]
    zi, zj = z[:, i].transpose(0, 1), z[:, j].transpose(0, 1)  # (P, N, D) each
    zm = everyone[partner, j[:, None]]  # (P, N, D) augmentation j of the partner image
    return torch.stack([aggregate(zi, zj, how), aggregate(zi, zm, how)])  # (2, P, N, A)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Mean over all entries of FL = -alpha_t (1 - p_t)^gamma log p_t, p_t = sigmoid(y) for t = 1 and
    1 - sigmoid(y) for t = 0 (the code's ``FocalLoss``). logits, targets: the same shape, targets in {0, 1}."""
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log p_t
    sign = 2 * targets - 1  # +1 positives, -1 negatives
    one_minus_pt = torch.sigmoid(-sign * logits)  # 1 - p_t, exact for binary targets
    alpha_t = targets * alpha + (1 - targets) * (1 - alpha)
    return (alpha_t * one_minus_pt.pow(gamma) * bce).mean()  # the weighted mean over the 2 P N pairs


# --- model --------------------------------------------------------------------------------------------


class RelationalReasoning(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {cfg.aggregation!r}")
        if cfg.num_augmentations < 2:
            raise ValueError(f"relational reasoning needs at least 2 augmentations, got {cfg.num_augmentations}")
        self.cfg = cfg
        self.backbone = backbone  # f, shared by all K augmentations; no projector
        in_dim = 2 * feature_dim if cfg.aggregation == "cat" else feature_dim
        self.relation_head = relation_head(in_dim, cfg.relation_hidden_dim, cfg.leaky_slope)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        views = batch["views"]  # K tensors (N, C, H, W)
        k, n = len(views), views[0].shape[0]
        if k < 2:
            raise ValueError(f"relational reasoning needs at least 2 augmentations per image, got {k}")
        h = self.backbone(torch.cat(views))  # (K N, D): all views in one batch, as the code
        z = h.unflatten(0, (k, n)).transpose(0, 1)  # (N, K, D)
        pairs = relation_pairs(z, cfg.aggregation)  # (2, P, N, A)
        logits = self.relation_head(pairs.flatten(0, 2)).view(2, -1)  # (2, P N): positives, negatives
        with torch.autocast(logits.device.type, enabled=False):  # the loss in float32
            logits = logits.float()
            targets = torch.tensor([[1.0], [0.0]], device=logits.device).expand_as(logits)  # (2, P N)
            loss = focal_loss(logits, targets, cfg.focal_gamma, cfg.focal_alpha)
        with torch.no_grad():
            bce = F.binary_cross_entropy_with_logits(logits, targets)  # the Bernoulli log-likelihood
            correct = (logits > 0) == (targets > 0.5)  # (2, P N)
            acc_pos, acc_neg = correct[0].float().mean(), correct[1].float().mean()
        return {"loss": loss, "bce": bce, "accuracy": (acc_pos + acc_neg) / 2, "accuracy_pos": acc_pos,
                "accuracy_neg": acc_neg}

    def param_groups(self) -> list[dict]:
        """The backbone, then the relation head (the code's two Adam groups, both at lr 1e-3), at the peak
        rate throughout when ``constant_lr`` (the code has no schedule)."""
        head = [p for p in self.relation_head.parameters() if p.requires_grad]
        ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "fixed_lr": self.cfg.constant_lr},
                {"params": head, "fixed_lr": self.cfg.constant_lr}]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (the paper's linear evaluation trains on the backbone's pooled output)."""
        return self.backbone(x)


MODEL = RelationalReasoning


if __name__ == "__main__":
    z = torch.randn(6, 4, 16)  # 6 images, K = 4 augmentations, 16-d features
    pairs = relation_pairs(z)
    print("pairs:", tuple(pairs.shape), "(positives/negatives, K(K-1)/2 augmentation pairs, images, 2D)")
    head = relation_head(32, 256, 0.01)
    logits = head(pairs.flatten(0, 2)).view(2, -1)
    targets = torch.tensor([[1.0], [0.0]]).expand_as(logits)
    print("focal loss at init:", focal_loss(logits, targets).item(), "chance:", 0.5 * 0.25 * 0.6931)
