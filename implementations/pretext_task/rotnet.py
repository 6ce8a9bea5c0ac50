"""RotNet — Gidaris, Singh, Komodakis. "Unsupervised Representation Learning by Predicting Image Rotations".
ICLR 2018, arXiv:1803.07728. Catalog id: ``rotnet``.
Official code: https://github.com/gidariss/FeatureLearningRotNet (``dataloader.py``, ``config/CIFAR10_RotNet_NIN4blocks.py``,
``architectures/NetworkInNetwork.py``, ``architectures/AlexNet.py``).

A ConvNet F learns to recognise which of K = 4 geometric transformations g(. | y) was applied to its input:
the rotations by 0, 90, 180 and 270 degrees, g(X | y) = Rot(X, (y - 1) 90). With F^y(X | theta) the
predicted probability (a softmax over 4 logits) of rotation y, the objective over N training images is
(Sec. 2.1-2.2)

    min_theta  1/N sum_i loss(X_i, theta),      loss(X_i, theta) = -1/K sum_{y=1}^{K} log F^y(g(X_i | y) | theta),

a 4-way cross-entropy over the rotation label, averaged over ALL FOUR rotated copies of every image: the
paper found feeding the four copies of each image together in the same batch clearly better than sampling
one rotation per image, so a batch of N images is 4N inputs (as the official data loader does). Here
``forward`` makes the four copies of every view with exact ``torch.rot90`` (counter-clockwise on (H, W),
the official ``rotate_img``: 90 = flipud(transpose), 270 = transpose(flipud)), image-major: row 4i + r is
image i rotated r x 90 degrees, with label r. The rotations involve no randomness at all (every image gets
all four), so nothing is drawn from the RNG; the only random draws are the harness's crops and flips of
the view, made from its per-step seed, so runs resume exactly.

Collapse / shortcuts: the targets are generated labels, so a constant representation cannot lower the loss
below log 4 (chance); features must tell the orientation of the image, which needs the object's identity
and pose (the paper's argument). Multiples of 90 degrees are flips and transposes: unlike other rotation
angles or rescalings they leave no interpolation or border artefacts that would give the answer away, and
the 4-way task is unambiguous for most images (Sec. 2.2). Four rotations beat 2 and 8 (Table 2), so K = 4.

Head: the paper's rotation classifier sits on top of the layers it evaluates. On CIFAR (NIN, 4 blocks),
conv blocks 3-4, a global average pool and one linear layer sit above the block-2 features that give the
best linear and non-linear evaluation; on ImageNet (AlexNet), the fc6-fc7 block (Linear without bias - BN
- ReLU, twice, 4096 wide) and a linear fc8 sit above the conv5 features. Our backbones expose only a pooled
feature vector, so the layers above the evaluated features are a fully connected head on it, AlexNet's:
``head_layers`` x [Linear (no bias) - BN1d - ReLU] of ``head_hidden_dim``, then Linear(., 4). It keeps the
most rotation-specific computation out of the features ``embed`` returns, as the paper's evaluated layers
are below the top of the network (its later blocks specialise to the pretext task, Sec. 3.1, Table 1);
``head_layers`` 0 puts NIN's global-pool-and-linear classifier directly on the backbone.

``embed`` returns the backbone's pooled features of the upright image (the paper's linear evaluation reads
an intermediate layer: conv block 2 of the NIN on CIFAR, conv1-conv5 of AlexNet on ImageNet; the pooled
output is what our backbones expose).

Distributed: each image's loss uses only its own four rotated copies, and the rotations are deterministic,
so the mean over ranks of the per-rank mean is the global batch's loss and DDP's gradient averaging does
the rest; nothing is gathered.

Deviations:
- the backbone is the harness's (small CNN or CIFAR ResNet-18 at 32 px) in place of NIN / AlexNet; the
  rotation classifier is a fully connected head on its pooled features (see Head);
- views: the CIFAR recipe RandomCrop(32, padding=4) + flip (official ``dataloader.py``) has no batched
  counterpart in the harness; a square RandomResizedCrop keeping at least 77% of the area (a 28-px square
  of a 32-px image, shifts of up to 4 px = 1/8 of the side, with a zoom of up to 1.14; the fraction scales
  with the image size) + flip stands in for it, as in crd.py. The ImageNet recipe is RandomResizedCrop's
  default (``min_scale`` 0.08; official ``random_sized_crop``) + flip;
- learning rate: the harness's cosine decay without warm-up in place of the official steps (x0.2 at epochs
  60, 120, 160 of 200) and plain SGD momentum in place of Nesterov (the harness's SGD has no Nesterov
  option); biases and BN parameters get no weight decay (the harness's parameter groups; official: all);
- per-channel normalisation with the data set's mean and std (the harness's), as the official code does
  with CIFAR's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

NUM_ROTATIONS = 4  # K: 0, 90, 180, 270 degrees (Table 2: 4 beats 2 and 8)


@dataclass(frozen=True)
class Config:
    head_hidden_dim: int = 4096
    """Width of the hidden layers of the rotation classifier (AlexNet's fc6 and fc7, official
    ``architectures/AlexNet.py``; see Head in the module docstring)."""
    head_layers: int = 2
    """Hidden [Linear - BN - ReLU] layers of the rotation classifier: 2 as AlexNet's fc6-fc7; 0 is NIN's
    global-pool-and-linear classifier (official ``NetworkInNetwork.py``) directly on the backbone."""
    min_scale: float = 0.77
    """Smallest area fraction of the square random resized crop standing in for CIFAR's RandomCrop(32,
    padding=4) (official ``dataloader.py``; see Deviations); ImageNet: 0.08 (official ``random_sized_crop``)."""
    optimizer: str = "sgd"
    """SGD with momentum (Sec. 3.1; official config ``optim_type: sgd``, with Nesterov, see Deviations)."""
    base_lr: float = 0.2
    """lr 0.1 at batch 128 (Sec. 3.1; official config ``lr: 0.1``), i.e. 0.2 per 256 images in the harness's
    linear scaling (the batch counts images, each fed as its 4 rotated copies)."""
    weight_decay: float = 5e-4
    """Sec. 3.1; official config ``weight_decay: 5e-4``."""
    momentum: float = 0.9
    """Sec. 3.1; official config ``momentum: 0.9``."""
    warmup_epochs: int = 0
    """No warm-up (official config ``LUT_lr`` starts at 0.1)."""
    epochs: int = 200
    """Official config ``max_num_epochs: 200`` for CIFAR-10 (NIN, 4 blocks). The paper's CIFAR schedule is
    not verified here (ImageNet: 50 epochs, official ``ImageNet_RotNet_AlexNet.py``)."""
    batch_size: int = 128
    """Images per batch, 4 x 128 = 512 rotated inputs (Sec. 3.1; official config ``batch_size = 128``)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 images of 32 px, 15 epochs = 330 steps at
# batch 64, i.e. 256 rotated inputs per step):
# - head_hidden_dim 256: two 4096-wide layers on the small CNN's 256 features are 18M multiply-adds per input,
#   more than the small CNN's 15M at 32 px (the step would double); 256 is the backbone's own width;
# otherwise the paper's recipe (SGD at base_lr 0.2, i.e. 0.05 at batch 64, weight decay 5e-4, the CIFAR crop).
# `selfsup train rotnet` with it: k-NN top-1 0.897 (random init 0.839), linear 0.994 (0.986), RankMe 36.6
# (10.2), 354 s on a shared 2-core CPU; the rotation loss falls from log 4 to about 0.1 (95% of the
# rotations recognised).
PRESETS = {"small": dict(head_hidden_dim=256)}


# --- augmentations (official dataloader.py: CIFAR random crop with padding 4, flip) -------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: a square random resized crop (area from ``min_scale``, standing in for the CIFAR pad-and-crop)
    and a horizontal flip (official ``dataloader.py``); ``forward`` makes its four rotations. Takes a PIL
    image or a uint8 tensor."""
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


# --- head -------------------------------------------------------------------------------------------


def rotation_head(in_dim: int, hidden_dim: int, layers: int, num_outputs: int) -> nn.Module:
    """``layers`` x [Linear without bias - BN1d - ReLU] of width ``hidden_dim``, then Linear(., num_outputs)
    (AlexNet's fc6-fc7 block and fc8 classifier, official ``architectures/AlexNet.py``); layers 0: one Linear
    (NIN's classifier after the global pool)."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, num_outputs))
    return nn.Sequential(*blocks)


# --- loss -------------------------------------------------------------------------------------------


def rotation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/N sum_i -1/K sum_y log F^y(g(X_i | y)): the mean over the 4N rotated copies of the cross-entropy
    of the 4-way softmax with the rotation label. logits: (4N, 4); target: (4N,) in {0, 1, 2, 3}."""
    return F.cross_entropy(logits.float(), target)  # each image has its K copies in the batch: the mean over 4N


# --- model ------------------------------------------------------------------------------------------


class RotNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.head_layers < 0:
            raise ValueError(f"head_layers must be 0 or more, got {cfg.head_layers}")
        self.cfg = cfg
        self.backbone = backbone  # F's convolutional part, shared by the four rotations
        self.head = rotation_head(feature_dim, cfg.head_hidden_dim, cfg.head_layers, NUM_ROTATIONS)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]  # (N, C, H, W)
        rotated, target = four_rotations(x)  # (4N, C, H, W), (4N,): all four copies of every image, one batch
        logits = self.head(self.backbone(rotated))  # (4N, 4)
        loss = rotation_loss(logits, target)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == target).float().mean()  # the pretext task's accuracy
        return {"loss": loss, "rotation_acc": accuracy}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the upright image (the paper evaluates intermediate conv features)."""
        return self.backbone(x)


MODEL = RotNet


if __name__ == "__main__":
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    rotated, labels = four_rotations(x)
    print("image 0 rotated by 90 degrees:\n", rotated[1, 0], "\nlabels:", labels.tolist())
    print("uniform logits:", rotation_loss(torch.zeros(8, 4), labels).item(), "= log 4")
