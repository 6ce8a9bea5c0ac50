"""SLA (self-supervised label augmentation) — Lee, Hwang, Shin. "Self-supervised Label Augmentation via Input
Transformations". ICML 2020, arXiv:1910.05872. Catalog id: ``lee-2020-label-augmentation``.
Official code: https://github.com/hankook/SLA (``trainers.py``, ``augmentations.py``, ``train.py``).

A SUPERVISED method: labels enter the loss. Instead of adding a rotation-prediction loss to the classification
loss (multi-task learning, which asks the shared features to be invariant to the rotations for the class head
and to see them for the rotation head), SLA augments the label space: with N classes and M transformations
t_1..t_M (the four rotations by 0, 90, 180, 270 degrees, t_1 the identity), every pair (class i,
transformation j) is a label of its own, and one classifier with N x M outputs, the joint logits z~(x),
is trained with one softmax over all of them on every transformed copy (the paper's L_SLA):

    L_SLA(x, y) = 1/M sum_{j=1}^{M} L_CE( softmax(z~(t_j(x))), (y, j) ),

averaged over the batch, with all M transformed copies of every image in the batch (official
``create_sla_trainer``). The joint label (i, j) is output index i * M + j (class-major: official
``labels * n + i``). The rotated copies are exact ``torch.rot90`` inside ``forward`` (counter-clockwise on
(H, W), image-major: row 4n + j is image n rotated j x 90 degrees, as the official ``rotation`` transform);
they involve no randomness, so nothing is drawn from the RNG (the harness's crops and flips come from its
per-step seed, so runs resume exactly).

Aggregated inference (SLA+AG): the transformation of each test copy is known, so only the logits of the
joint labels (i, j) are read at the copy t_j(x), and they are averaged over the M copies,

    s_i(x) = 1/M sum_{j=1}^{M} z~_{i M + j}(t_j(x)),      P_aggregated(i | x) = softmax(s(x))_i,

the geometric mean of the conditional class probabilities of the M copies (official ``agg_preds``, the mean
of ``preds[j::M, j::M]``; a sum instead of the mean has the same argmax). ``aggregated_logits(images)``
returns s (N, num_classes); ``single_logits`` would be z~_{i M}(x) of the upright image alone (SLA+SI,
official ``preds[::M, ::M]``), logged in training as ``single_acc``. The paper's self-distillation
(SLA+SD: an extra head trained on the aggregated prediction by a KL term) is not implemented.

Collapse: the targets are ground-truth classes crossed with generated rotation labels, so a constant
representation is stuck at the loss log(N M); nothing else compares images. What SLA removes is the
invariance constraint of data augmentation and multi-task learning (rotated images as extra samples of
their class, or a rotation head beside the class head, which the paper finds to gain little or to hurt):
the joint classifier may keep the rotation in the features and read it together with the class.

``embed`` returns the backbone's pooled features of the upright image (the classifier's input; the paper
evaluates the classifier itself, not a linear probe). The catalog marks the entry ``uses_labels``: its
k-NN and linear figures on a data set are those of a supervised model.

Distributed: each image's loss uses only its own four rotated copies and its own label (a per-sample
cross-entropy), and the rotations are deterministic, so the mean over ranks of the per-rank means is the
global batch's loss and DDP's gradient averaging does the rest; nothing is gathered.

Deviations:
- the backbone is the harness's (small CNN or CIFAR ResNet-18 at 32 px) in place of the official CIFAR
  ResNet-32 (``cresnet32``); the joint classifier is, as there, one Linear on the pooled features;
- views: the CIFAR recipe RandomCrop(32, padding=4) + flip (official ``datasets.py``) has no batched
  counterpart in the harness; a square RandomResizedCrop keeping at least 77% of the area (a 28-px square
  of 32 px: shifts of up to 4 px = 1/8 of the side, with a zoom of up to 1.14; the fraction scales with the
  image size) + flip stands in for it, as in crd.py. The large-image recipe is RandomResizedCrop's default
  (``min_scale`` 0.08) + flip. Normalisation uses the data set's mean and std (official: 0.5, 0.5);
- learning rate: the harness's cosine decay in place of the official steps (x0.1 at 1/2 and 3/4 of the
  80,000 iterations); the training length is in epochs (80,000 x 128 images over the official 45,000-image
  training split, 5,000 kept for validation, ~228 epochs); biases and BN parameters get no weight decay (the
  harness's parameter groups; official: all);
- the official code samples every batch at random with replacement across batches (``BatchSampler``:
  ``random.sample`` per iteration); the harness goes through the data in shuffled epochs;
- no self-distillation (SLA+SD), see above; the rotations are the only transformations (the official code
  also has colour permutations and their products with rotations, ``augmentations.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

NUM_ROTATIONS = 4  # M: 0, 90, 180, 270 degrees (official ``augmentations.rotation``)


@dataclass(frozen=True)
class Config:
    uses_labels: bool = True
    """The harness passes class labels (site/method-interface.md, "Labels"): the joint labels need them."""
    large_loss: bool = False
    """Sum of the M cross-entropies instead of their mean, i.e. L_SLA x M (official ``--with-large-loss``, which
    the README recommends for ImageNet and iNaturalist; off for CIFAR)."""
    min_scale: float = 0.77
    """Smallest area fraction of the square random resized crop standing in for CIFAR's RandomCrop(32,
    padding=4) (official ``datasets.py``; see Deviations); large images: 0.08 (RandomResizedCrop's default)."""
    optimizer: str = "sgd"
    """SGD with momentum 0.9, no Nesterov (official ``train.py``)."""
    base_lr: float = 0.2
    """lr 0.1 at batch 128 (official ``--lr 0.1``, ``--batchsize 128``), i.e. 0.2 per 256 images in the
    harness's linear scaling (the batch counts images, each fed as its 4 rotated copies)."""
    weight_decay: float = 1e-4
    """Official ``--wd 1e-4``."""
    momentum: float = 0.9
    """Official ``train.py`` (``optim.SGD(..., momentum=0.9)``)."""
    warmup_epochs: int = 0
    """No warm-up (official ``train.py``)."""
    epochs: int = 228
    """80,000 iterations at batch 128 (official README and ``--num-iterations 80000``) over the 45,000 training
    images of the official CIFAR split: 227.6 epochs."""
    batch_size: int = 128
    """Images per batch, 4 x 128 = 512 rotated inputs (official ``--batchsize 128``)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 images of 32 px, 10 classes, 15 epochs = 330
# steps at batch 64, i.e. 256 rotated inputs per step): the paper's recipe fits as it is (a linear joint
# classifier of 40 outputs on the small CNN; SGD at base_lr 0.2, i.e. 0.05 at batch 64, weight decay 1e-4),
# so nothing changes. `selfsup train lee-2020-label-augmentation` with it (labels in training: a supervised
# model, not a self-supervised comparison): k-NN top-1 0.989 (random init 0.839), linear 0.994 (0.986), 362 s
# on a shared 2-core CPU; at the last step the joint accuracy is 0.89, single and aggregated 0.98.
PRESETS: dict[str, dict] = {"small": {}}


# --- augmentations (official datasets.py: CIFAR random crop with padding 4, flip) ---------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: a square random resized crop (area from ``min_scale``, standing in for the CIFAR pad-and-crop)
    and a horizontal flip (official ``datasets.py``); ``forward`` makes its four rotations. Takes a PIL image or
    a uint8 tensor."""
    return [
        v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), ratio=(1.0, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])
    ]


# --- the rotations (on tensors, inside forward) -----------------------------------------------------


def four_rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of x (N, C, H, W), H = W, rotated by 0, 90, 180 and 270 degrees counter-clockwise (exact
    ``torch.rot90`` on (H, W)), image-major: returns (4N, C, H, W) whose row 4i + r is image i rotated
    r x 90 degrees, and the labels (4N,) r."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations by 90 degrees need square views, got {x.shape[-2]}x{x.shape[-1]}")
    rotated = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(4)], dim=1)  # (N, 4, C, H, W)
    labels = torch.arange(4, device=x.device).repeat(x.shape[0])  # (4N,) 0, 1, 2, 3, 0, 1, ...
    return rotated.flatten(0, 1), labels


# --- joint labels, loss, aggregation --------------------------------------------------------------------


def joint_labels(label: torch.Tensor, transformation: torch.Tensor, num_transformations: int) -> torch.Tensor:
    """The index of the joint label (class y, transformation j): y * M + j (official ``labels * n + i``).
    label, transformation: (K,) -> (K,)."""
    return label * num_transformations + transformation


def sla_loss(joint_logits: torch.Tensor, target: torch.Tensor, num_transformations: int,
             large_loss: bool = False) -> torch.Tensor:
    """L_SLA averaged over the batch: 1/N sum_n 1/M sum_j CE(softmax(z~(t_j(x_n))), (y_n, j)), one softmax over
    all N_c x M joint labels. joint_logits: (N M, N_c M), the M copies of every image; target: (N M,) joint
    indices. large_loss: the sum over j instead of the mean (x M, official ``--with-large-loss``)."""
    loss = F.cross_entropy(joint_logits.float(), target)  # the mean over the N M copies = mean_n mean_j
    return loss * num_transformations if large_loss else loss


def aggregate(joint_logits: torch.Tensor, num_transformations: int) -> torch.Tensor:
    """s_i = 1/M sum_j z~_{i M + j}(t_j(x)): joint_logits (N M, N_c M), image-major rows (row n M + j is
    t_j(x_n)) -> (N, N_c), the aggregated class logits (official ``agg_preds``)."""
    m = num_transformations
    z = joint_logits.unflatten(0, (-1, m)).unflatten(2, (-1, m))  # (N, M copies, N_c, M transformations)
    return z.diagonal(dim1=1, dim2=3).mean(dim=2)  # (N, N_c, M) the logit of (i, j) at copy j -> mean over j


# --- model ------------------------------------------------------------------------------------------


class SLA(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if not cfg.uses_labels:
            raise ValueError("SLA trains on (class, rotation) joint labels: it needs uses_labels=true")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.head: nn.Linear | None = None  # the joint classifier, N_c M outputs, made in setup()

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The joint classifier: one Linear from the pooled features to N_c x M logits (official ``cresnet``
        with ``nn.Linear(num_features, n * m)``)."""
        if num_classes < 1:
            raise ValueError(f"SLA needs the number of classes, got {num_classes}")
        device = next(self.backbone.parameters()).device
        self.num_classes = num_classes
        self.head = nn.Linear(self.feature_dim, num_classes * NUM_ROTATIONS).to(device)

    def joint_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z~ of the four rotated copies of every image (4N, N_c M), their rotation indices (4N,))."""
        if self.head is None:
            raise RuntimeError("SLA: call setup(num_samples, num_classes) to build the joint classifier first")
        rotated, rotation = four_rotations(images)  # (4N, C, H, W), (4N,): all four copies, one batch
        return self.head(self.backbone(rotated)), rotation

    def forward(self, batch: dict) -> dict:
        x, label = batch["views"][0], batch["label"]  # (N, C, H, W), (N,)
        if bool((label < 0).any()):
            raise ValueError("SLA needs class labels (got -1): set uses_labels=true so that the harness passes them")
        z, rotation = self.joint_logits(x)  # (4N, N_c M), (4N,)
        target = joint_labels(label.repeat_interleave(NUM_ROTATIONS), rotation, NUM_ROTATIONS)  # (4N,)
        loss = sla_loss(z, target, NUM_ROTATIONS, self.cfg.large_loss)
        with torch.no_grad():
            joint_acc = (z.argmax(dim=1) == target).float().mean()
            single_acc = (z[::NUM_ROTATIONS, ::NUM_ROTATIONS].argmax(dim=1) == label).float().mean()  # SLA+SI
            agg_acc = (aggregate(z, NUM_ROTATIONS).argmax(dim=1) == label).float().mean()  # SLA+AG
        return {"loss": loss, "joint_acc": joint_acc, "single_acc": single_acc, "agg_acc": agg_acc}

    @torch.no_grad()
    def aggregated_logits(self, images: torch.Tensor) -> torch.Tensor:
        """SLA+AG: s (N, N_c), the joint logits of (i, j) at the copy t_j(x), averaged over the four rotations."""
        return aggregate(self.joint_logits(images)[0], NUM_ROTATIONS)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the upright image (the joint classifier's input)."""
        return self.backbone(x)


MODEL = SLA


if __name__ == "__main__":
    z = torch.randn(2 * 4, 3 * 4)  # 2 images x 4 copies, 3 classes x 4 rotations
    labels = joint_labels(torch.tensor([2, 0]).repeat_interleave(4), torch.arange(4).repeat(2), 4)
    print("joint labels:", labels.tolist())
    print("L_SLA:", sla_loss(z, labels, 4).item(), "aggregated logits:", aggregate(z, 4).shape)
