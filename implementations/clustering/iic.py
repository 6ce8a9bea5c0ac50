"""IIC — Ji, Henriques, Vedaldi. "Invariant Information Clustering for Unsupervised Image Classification
and Segmentation". ICCV 2019, arXiv:1807.06653. Catalog id: ``iic``.
Official code: https://github.com/xu-ji/IIC (``code/utils/cluster/IID_losses.py``,
``code/scripts/cluster/cluster_sobel_twohead.py``; "IID" is the code's old name for IIC).

A network Phi ends in softmax heads over C clusters. For an image x and a randomly transformed copy
x' = g x, the cluster assignments z, z' of the pair have the joint distribution Phi(x) Phi(x')^T; over a
batch of n pairs (Eq. 3 and the text around it)

    P = (1/n) sum_i Phi(x_i) Phi(x'_i)^T   (C x C),   P <- (P + P^T) / 2,
    I(z, z') = sum_c sum_c' P_cc' ln( P_cc' / (P_c P_c') ),

with P_c, P_c' the row and column marginals. The loss is -I, per head; the official ``IID_loss`` writes
it as - sum P (ln P - lamb ln P_c' - lamb ln P_c) with ``lamb`` 1 (so exactly -I) and clamps P and the
marginals from below at EPS = ``sys.float_info.epsilon`` (entries below it become the constant EPS and
pass no gradient), after the marginals are taken from the unclamped P.

Sources: the defaults are the CIFAR-10 run of the official examples/commands.txt (model 640:
``cluster_sobel_twohead --gt_k 10 --output_k_A 70 --output_k_B 10 --lamb 1.0 --lr 0.0001 --num_epochs 2000
--batch_sz 660 --num_dataloaders 3 --num_sub_heads 5 --crop_orig --rand_crop_sz 20 --input_sz 32
--head_A_first --head_B_epochs 2``) and the code it runs. The paper's own text beyond Eq. 3 (Sec. 4 and
the supplementary's training details) could not be read for this file (the PDFs in the official
repository were not retrievable), so no value here is cited to it.

Heads (official ``ClusterNet5gTwoHead``): a main head with C = the number of ground-truth classes and an
auxiliary over-clustering head with k > C clusters (70 for the 10 classes of CIFAR-10 and STL-10), each
made of ``num_sub_heads`` = 5 independent linear + softmax sub-heads on the trunk's features; a head's
loss is the mean of its sub-heads' losses. The heads are trained alternately (official training loop):
every epoch runs the over-clustering head for ``head_A_epochs`` = 1 pass over the data, then the main
head for ``head_B_epochs`` = 2 passes (CIFAR-10 command, ``--head_A_first --head_B_epochs 2``). Here each
harness epoch is one such pass: ``on_epoch_start`` cycles through ``overcluster_epochs`` epochs of the
auxiliary head then ``main_epochs`` epochs of the main head (``alternate=False`` sums both heads every
step instead). ``assign`` takes the argmax of the main sub-head with the lowest loss (the official
``--select_sub_head_on_loss``), tracked as a running mean of each main sub-head's training loss.

Repeats: each image x is paired with ``num_repeats`` independently transformed copies x'_1..x'_r
(official ``--num_dataloaders 3`` for CIFAR-10: the batch of 660 pairs holds 220 images, each 3 times).
The view recipe is 1 + r views: view 0 is x (random crop only, official ``tf1``), views 1..r are the
x'_d (random crop, flip, colour jitter, official ``tf2``). ``forward`` pairs x with every x'_d, so P is
over r N pairs. x is encoded once and its outputs repeated r times: the official code feeds x repeated
r times as one batch, whose BatchNorm statistics are those of x once.

Sobel (official ``sobel_process``, "cluster_sobel" scripts for CIFAR and STL): each view is converted to
greyscale (PIL's luma weights) and filtered with the two 3x3 Sobel kernels, and the network sees the two
gradient images instead of colour. This is a pretext transform made inside ``forward`` (and inside
``embed``/``assign``) from the normalised views: the normalisation is undone first
(``set_normalization``).

Collapse: I(z, z') = H(z) - H(z | z'). A constant output (every image in one cluster, or every image
given the same distribution) makes z and z' independent and I = 0, the worst value; I is largest, ln C,
when the clusters are used equally (H(z) = ln C) and the two views are assigned deterministically to the
same cluster (H(z | z') = 0). The entropy term keeps the clusters balanced over the batch.

Distributed: P is a statistic of the batch, so it is the global batch's: the softmax outputs of both
views (all heads and sub-heads at once) are all-gathered with gradient (``gather_with_grad``, whose
backward sums the gradients of every rank's copy of the loss, so that with DDP's averaging 2 ranks give
the gradients of one process on the concatenated batch) and every rank computes the same loss. The
sub-head losses tracked for ``assign`` are then the same on every rank.

Deviations:
- the inactive head's loss enters with weight 0, so that every parameter gets a gradient each step
  (DDP without ``find_unused_parameters``); the official loop's ``zero_grad`` also leaves zero (not
  missing) gradients on the inactive head after its first epoch, so Adam steps it the same way;
- the backbone takes 3 channels: the Sobel input is (dx, dy, 0), the official two channels and a zero one
  that carries nothing (the official trunk's first conv has 2 input channels);
- the random crop + resize (official ``RandomCrop(20)`` then ``Resize(32)``) is a ``RandomResizedCrop`` with
  a fixed area (crop_fraction^2) and aspect ratio 1, so that it runs batched on the device: the same crops;
  greyscale and Sobel are computed in float from the views (official: PIL's 8-bit greyscale);
- evaluation (``embed``, ``assign``) applies the official test transform (``tf3``: centre crop of the same
  size, resized back) to the harness's evaluation images;
- the sub-head with the lowest loss is chosen from a running mean of the training losses (official:
  a pass over the training set in eval mode after each epoch), because ``assign`` sees no training set;
- the harness's schedule (cosine decay, no warm-up) instead of the official constant rate, and its
  backbone and BatchNorm (official: ResNet-34-like ``ClusterNet5g``, BN without running statistics
  for CIFAR-10, ``--batchnorm_track`` off);
- the number of clusters of the main head is the data set's number of classes (``setup``) unless
  ``num_clusters`` sets it, and the over-clustering head has ``overcluster_factor`` times as many unless
  ``num_overclusters`` sets it (official: ``--gt_k``, ``--output_k_B``, ``--output_k_A`` given per data set).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

EPS = sys.float_info.epsilon
"""The official ``IID_loss`` default ``EPS=sys.float_info.epsilon`` (2.2e-16)."""


@dataclass(frozen=True)
class Config:
    num_clusters: int = 0
    """C of the main head; 0: the data set's number of classes, set in ``setup`` (official ``--gt_k 10
    --output_k_B 10`` for CIFAR-10; the code asserts ``output_k_B == gt_k``)."""
    num_overclusters: int = 0
    """k of the auxiliary over-clustering head; 0: ``overcluster_factor`` x C (official ``--output_k_A 70``)."""
    overcluster_factor: int = 7
    """k / C when ``num_overclusters`` is 0: 70 / 10 in the CIFAR-10 and STL-10 commands, 140 / 20 for
    CIFAR-100-20 (official examples/commands.txt; MNIST uses 50 / 10)."""
    num_sub_heads: int = 5
    """Sub-heads per head, each its own linear + softmax (official ``--num_sub_heads 5``)."""
    lamb: float = 1.0
    """Weight of the marginal terms in the official loss; 1 gives exactly -I (official ``--lamb 1.0``,
    also the ``IID_loss`` default)."""
    eps: float = EPS
    """Lower clamp on P and its marginals (official ``IID_loss`` ``EPS=sys.float_info.epsilon``)."""
    alternate: bool = True
    """Train the two heads in alternate epochs (official two-head loop); False: both losses every step."""
    overcluster_first: bool = True
    """The over-clustering head's epochs come first in each cycle (official ``--head_A_first``)."""
    overcluster_epochs: int = 1
    """Epochs of the over-clustering head per cycle (official ``--head_A_epochs``, default 1)."""
    main_epochs: int = 2
    """Epochs of the main head per cycle (official ``--head_B_epochs 2`` in the CIFAR-10 command)."""
    num_repeats: int = 3
    """Transformed copies x' per image, each paired with x (official ``--num_dataloaders 3`` for CIFAR-10;
    5 for STL-10; Table 2 ablates "no data repeats")."""
    sobel: bool = True
    """Greyscale + Sobel input (official ``cluster_sobel_twohead.py`` without ``--include_rgb``)."""
    crop_fraction: float = 20 / 32
    """Side of the random crop over the image's, resized back (official ``--rand_crop_sz 20 --input_sz 32``
    for CIFAR-10; 64 of 96 for STL-10); the test transform takes the centre crop of that size."""
    flip: bool = True
    """Random horizontal flip of x' (official ``sobel_make_transforms``; the MNIST command turns it off
    with ``--no_flip``)."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.125)
    """Colour jitter of x' (brightness, contrast, saturation, hue), always applied (official
    ``sobel_make_transforms``: ``ColorJitter(0.4, 0.4, 0.4, 0.125)``)."""
    subhead_loss_momentum: float = 0.9
    """Momentum of the running mean of each main sub-head's loss that picks ``assign``'s sub-head (ours:
    the official code evaluates the loss over the training set instead)."""
    optimizer: str = "adamw"
    """Adam (official ``--opt Adam``, no weight decay: AdamW with weight_decay 0 is Adam)."""
    base_lr: float = 1e-4 * 256 / 220
    """Official ``--lr 0.0001`` at 220 images (660 pairs) per batch, as a rate per 256 images."""
    weight_decay: float = 0.0
    """None (official ``torch.optim.Adam`` defaults)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's defaults (official)."""
    warmup_epochs: int = 0
    """None (official: a constant rate, ``--lr_schedule`` empty)."""
    epochs: int = 2000
    """Official ``--num_epochs 2000`` (CIFAR-10 and STL-10 commands); each official epoch is one pass of
    the over-clustering head and two of the main head, i.e. 3 harness epochs."""
    batch_size: int = 220
    """Images per batch: official ``--batch_sz 660`` pairs = 220 images x 3 repeats for CIFAR-10."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn):
# - epochs 15: the harness's budget; 5 cycles of one over-clustering epoch and two main-head epochs;
# - base_lr 0.016 per 256 (4e-3 at batch 64): Adam at the official 1e-4 barely leaves the near-uniform
#   start (I ~ 0 at the N(0, 0.01) head init) in 330 steps;
# - sobel off, flip off, overcluster_factor 5: the official MNIST command (greyscale digits), which runs
#   ``cluster_greyscale_twohead`` (greyscale input, no Sobel) with ``--no_flip`` and 50 = 5 x 10 clusters;
#   a mirrored digit is another digit, and a batch of 3 x 64 = 192 pairs spreads over 50 clusters;
# - crop_fraction 0.75 (24 of 32 px): an 8x8 digit upscaled to 32 px fills the image, and a 20-px crop
#   cuts away too much of it.
# With these, 15 epochs reach I ~ 1.05 nats of ln 10 = 2.30 and assign NMI 0.35 (random init 0.07), but the
# trunk's k-NN accuracy (0.53) stays below random init's (0.80); base_lr 0.04 with 5 repeats did not help.
PRESETS = {
    "small": dict(epochs=15, base_lr=0.016, sobel=False, flip=False, overcluster_factor=5, crop_fraction=0.75),
}


# --- augmentations (official sobel_make_transforms) ------------------------------------------------


def crop_size(cfg: Config, image_size: int) -> int:
    """The crop's side in pixels: 20 at 32 px with the paper's fraction."""
    return max(1, min(image_size, round(cfg.crop_fraction * image_size)))


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """1 + r views: x (random crop resized back, official ``tf1``), then r copies x' (random crop resized
    back, horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.125), official ``tf2``). The crop is a
    RandomResizedCrop of fixed area and ratio 1, i.e. a random square of ``crop_size`` px. Greyscale and
    Sobel follow inside ``forward``. Each takes a PIL image or a uint8 tensor."""
    side = crop_size(cfg, image_size)
    area = (side / image_size) ** 2
    crop = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(area, area), ratio=(1.0, 1.0), antialias=True)]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    x = v2.Compose(crop + tail)
    flip = [v2.RandomHorizontalFlip()] if cfg.flip else []
    x_tf = v2.Compose(crop + flip + [v2.ColorJitter(*cfg.jitter)] + tail)
    return [x] + [x_tf] * cfg.num_repeats


# --- Sobel input and the test transform -----------------------------------------------------------

LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L"), which the official to_grayscale calls
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))  # official sobel1
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))  # official sobel2


def sobel(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) normalised RGB -> (N, 3, H, W): the Sobel x and y responses of the greyscale image on
    [0, 1] (zero padding, official ``sobel_process``), and a zero third channel."""
    rgb = x * std.view(1, -1, 1, 1).to(x.dtype) + mean.view(1, -1, 1, 1).to(x.dtype)  # (N, 3, H, W) on [0, 1]
    grey = (rgb * torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kernels = torch.tensor((SOBEL_X, SOBEL_Y), dtype=x.dtype, device=x.device).unsqueeze(1)  # (2, 1, 3, 3)
    grad = F.conv2d(grey, kernels, padding=1)  # (N, 2, H, W)
    return torch.cat([grad, torch.zeros_like(grey)], dim=1)


def center_crop_resized(x: torch.Tensor, side: int) -> torch.Tensor:
    """The official test transform ``tf3``: the centre ``side`` x ``side`` crop, resized (bilinear) back to
    x's size. x: (N, C, H, W)."""
    h, w = x.shape[-2:]
    if side >= min(h, w):
        return x
    top, left = (h - side) // 2, (w - side) // 2
    crop = x[..., top:top + side, left:left + side]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


# --- the loss (official IID_losses.py) --------------------------------------------------------------


def joint_distribution(p: torch.Tensor, p_tf: torch.Tensor) -> torch.Tensor:
    """P (C, C): sum_i p_i p_tf_i^T over the n pairs, symmetrised and normalised to sum 1 (official
    ``compute_joint``). p, p_tf: (n, C) softmax outputs of x and x'."""
    joint = p.T @ p_tf  # (C, C) sum over pairs of the outer products
    joint = (joint + joint.T) / 2
    return joint / joint.sum()


def iic_loss(p: torch.Tensor, p_tf: torch.Tensor, lamb: float = 1.0, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, I): loss = - sum_cc' P_cc' (ln P_cc' - lamb ln P_c' - lamb ln P_c) and the mutual information
    I(z, z') = sum P ln(P / (P_c P_c')) (Eq. 3), both with the official clamps: the marginals come from
    the unclamped P, then P, P_c and P_c' below eps are replaced by eps (no gradient through those
    entries). p, p_tf: (n, C) softmax outputs. With lamb = 1, loss = -I."""
    joint = joint_distribution(p, p_tf)  # (C, C)
    p_row = joint.sum(dim=1, keepdim=True)  # (C, 1) P_c
    p_col = joint.sum(dim=0, keepdim=True)  # (1, C) P_c'
    eps_t = torch.tensor(eps, dtype=joint.dtype, device=joint.device)
    joint = torch.where(joint < eps, eps_t, joint)
    p_row = torch.where(p_row < eps, eps_t, p_row)
    p_col = torch.where(p_col < eps, eps_t, p_col)
    log_joint, log_row, log_col = joint.log(), p_row.log(), p_col.log()
    loss = -(joint * (log_joint - lamb * log_col - lamb * log_row)).sum()
    mi = (joint * (log_joint - log_col - log_row)).sum()
    return loss, mi


# --- distributed ------------------------------------------------------------------------------------


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


class SubHeads(nn.Module):
    """H independent linear + softmax sub-heads over K clusters, as one (H K, D) linear layer; weights
    N(0, 0.01), biases 0 (official ``_initialize_weights``). forward: (N, D) -> (N, H, K) probabilities."""

    def __init__(self, in_dim: int, num_heads: int, num_clusters: int):
        super().__init__()
        self.num_heads, self.num_clusters = num_heads, num_clusters
        self.linear = nn.Linear(in_dim, num_heads * num_clusters)
        nn.init.normal_(self.linear.weight, 0.0, 0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.linear(h).float().view(len(h), self.num_heads, self.num_clusters)
        return logits.softmax(dim=-1)


MAIN, OVER = 0, 1  # values of the ``training_head`` buffer


class IIC(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.num_repeats < 1 or cfg.num_sub_heads < 1:
            raise ValueError("IIC: num_repeats and num_sub_heads must be at least 1")
        if cfg.alternate and cfg.overcluster_epochs + cfg.main_epochs < 1:
            raise ValueError("IIC: overcluster_epochs + main_epochs must be at least 1 when alternating")
        self.cfg = cfg
        self.backbone = backbone
        self.feature_dim = feature_dim
        self._build_heads(cfg.num_clusters or 10)  # setup() sizes them from the data set
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)), persistent=False)
        first = OVER if cfg.overcluster_first and cfg.overcluster_epochs > 0 else MAIN
        self.register_buffer("training_head", torch.tensor(first))
        self.register_buffer("sub_head_loss", torch.zeros(cfg.num_sub_heads))  # running mean, main head
        self.register_buffer("sub_head_seen", torch.tensor(False))

    def _build_heads(self, num_clusters: int) -> None:
        cfg = self.cfg
        over = cfg.num_overclusters or cfg.overcluster_factor * num_clusters
        self.main_head = SubHeads(self.feature_dim, cfg.num_sub_heads, num_clusters)
        self.over_head = SubHeads(self.feature_dim, cfg.num_sub_heads, over)

    def set_normalization(self, mean, std) -> None:
        """The data set's per-channel mean and std, undone before the greyscale and Sobel filters."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype))

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The main head gets one cluster per class (official ``output_k_B == gt_k``) unless the Config sets
        ``num_clusters``; the over-clustering head ``overcluster_factor`` times as many."""
        if not self.cfg.num_clusters and num_classes != self.main_head.num_clusters:
            device = self.main_head.linear.weight.device
            self._build_heads(num_classes)
            self.main_head.to(device)
            self.over_head.to(device)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return sobel(x, self.mean, self.std) if self.cfg.sobel else x

    def _test_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._input(center_crop_resized(x, crop_size(self.cfg, x.shape[-1])))

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        views = batch["views"]  # x (N, C, H, W), then r copies x'_1..x'_r
        x, copies = views[0], views[1:]
        r = len(copies)
        if r < 1:
            raise ValueError("IIC: needs x and at least one transformed copy")
        f = self.backbone(self._input(x))  # (N, D), encoded once: BN statistics of x repeated r times
        f_tf = self.backbone(self._input(torch.cat(list(copies))))  # (r N, D), block d is x'_d
        f = f.repeat(r, 1)  # (r N, D): row d N + i is x_i, paired with x'_{d, i}
        heads = (self.main_head, self.over_head)
        sizes = [h.num_heads * h.num_clusters for h in heads]
        local = torch.cat([torch.cat([h(f).flatten(1), h(f_tf).flatten(1)], dim=1) for h in heads], dim=1)
        probs, _ = gather_with_grad(local)  # (r N_global, 2 (H C + H k)): P is the global batch's
        losses, mis = [], []
        for head, part in zip(heads, probs.split([2 * s for s in sizes], dim=1)):
            p, p_tf = part.view(len(part), 2, head.num_heads, head.num_clusters).unbind(1)  # (n, H, K) each
            pairs = [iic_loss(p[:, j], p_tf[:, j], cfg.lamb, cfg.eps) for j in range(head.num_heads)]
            losses.append(torch.stack([lo for lo, _ in pairs]))  # (H,)
            mis.append(torch.stack([mi for _, mi in pairs]).detach())
        if cfg.alternate:
            active = int(self.training_head)
            loss = losses[active].mean() + 0.0 * losses[1 - active].mean()  # every parameter gets a gradient
        else:
            loss = losses[MAIN].mean() + losses[OVER].mean()
        with torch.no_grad():
            main = losses[MAIN].detach().to(self.sub_head_loss.dtype)
            m = cfg.subhead_loss_momentum if bool(self.sub_head_seen) else 0.0
            self.sub_head_loss.mul_(m).add_((1 - m) * main)
            self.sub_head_seen.fill_(True)
        return {"loss": loss, "mi_main": mis[MAIN].mean(), "mi_over": mis[OVER].mean(),
                "mi_main_best": mis[MAIN].max(), "training_head": self.training_head.float()}

    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """Which head this epoch trains: ``overcluster_epochs`` epochs of the over-clustering head and
        ``main_epochs`` of the main head, in cycles (``features`` is not used)."""
        cfg = self.cfg
        if not cfg.alternate:
            return
        pos = epoch % (cfg.overcluster_epochs + cfg.main_epochs)
        if cfg.overcluster_first:
            head = OVER if pos < cfg.overcluster_epochs else MAIN
        else:
            head = MAIN if pos < cfg.main_epochs else OVER
        self.training_head.fill_(head)

    def best_sub_head(self) -> int:
        """The main sub-head with the lowest running loss (the first before any step)."""
        return int(self.sub_head_loss.argmin())

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's features of the test transform of x (Sobel input when ``sobel``), (N, D)."""
        return self.backbone(self._test_input(x))

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The argmax of the best main sub-head, (N,) in [0, C): the method's own clustering of x."""
        return self.main_head(self.embed(x))[:, self.best_sub_head()].argmax(dim=1)


MODEL = IIC


if __name__ == "__main__":
    c = 10
    perfect = torch.eye(c).repeat(3, 1)  # every cluster equally often, both views alike
    print("I of a perfect assignment", iic_loss(perfect, perfect)[1].item(), "= ln C", math.log(c))
    flat = torch.full((30, c), 1 / c)
    print("I of a uniform output", iic_loss(flat, flat)[1].item())
