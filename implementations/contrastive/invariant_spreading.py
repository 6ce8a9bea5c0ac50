"""Invariant Spreading — Ye, Zhang, Yuen, Chang. "Unsupervised Embedding Learning via Invariant and Spreading
Instance Feature". CVPR 2019, arXiv:1904.03436. Catalog id: ``invariant-spreading``. Official code:
mangye16/Unsupervised_Embedding_Learning.

A batch of m images x_1..x_m and their augmented copies x̂_i = T(x_i) go through one network (a siamese
pair with shared weights) to L2-normalised 128-d features f_i and f̂_i. The instance features f_k of the
batch itself, not a memory bank or classifier weights, are the weights of an m-way softmax (Sec. 3.2):

    P(i | x̂_i) = exp(f_i . f̂_i / tau) / sum_{k=1..m} exp(f_k . f̂_i / tau)    (x̂_i recognised as i)
    P(i | x_j) = exp(f_i . f_j / tau) / sum_{k=1..m} exp(f_k . f_j / tau),  j != i   (x_j recognised as i)

Assuming that the events "x_j is recognised as i" are independent, the probability that x̂_i is recognised
as instance i and no other x_j is recognised as i is P(i | x̂_i) prod_{j != i} (1 - P(i | x_j)); the negative
log-likelihood summed over the batch is the loss

    J = - sum_i log P(i | x̂_i) - sum_i sum_{j != i} log(1 - P(i | x_j)).

The first term pulls f̂_i to f_i (augmentation invariance), the second pushes the other instances away
from it (spreading). ``invariant_spreading_loss`` returns J / m. The k = j term of P(i | x_j)'s
denominator is exp(f_j . f_j / tau) = exp(1 / tau), as in the equation, so P(i | x_j) <= 1/2. Both views
go through the network in one batch, as in the official code (BN statistics over both).

Collapse: the other instances of the batch are negatives in both terms. Identical features give
P = 1/m everywhere and J / m = log m - (m - 1) log(1 - 1/m), above the value for orthogonal instances with
exact copies, log(1 + (m - 1) e^(-1/tau)) - (m - 1) log(1 - 1 / (e^(1/tau) + m - 1)) (the tests check
both).

Distributed: the instance weights f_k are the GLOBAL batch (m = the global batch size), all-gathered with
gradient (``gather_with_grad``). Each rank computes -log P(i | x̂_i) for its own instances and
-sum_{i != j} log(1 - P(i | x_j)) for its own samples x_j (the second term of J rearranged as a sum over
j), divided by its own batch size; the mean over ranks that DDP takes is J / m of the concatenated batch.

Deviations:
- this file implements the equations above; the official code (``BatchCriterion``) computes a variant:
  all 2m features are scored against each other with the diagonal removed, so both views act as
  samples and as weights and the k = j term is absent. Its gradient rule is kept (``detach_weights``,
  on by default): the weights' side of every similarity is a constant (``.data`` there), so each branch
  gets its gradient through its own features as samples: f̂_i through the first term, f_j through the
  second;
- ``augment_instance_view`` is off by default, as Sec. 3.2 describes (x̂_i = T(x_i) augments the sampled
  image x_i); the official code draws both inputs from T, and the small preset does too (see PRESETS);
- the flip comes right after the crop instead of last (official order: crop, jitter, grayscale, flip):
  it commutes with the per-pixel colour operations, so the views have the same distribution;
- the learning rate: the harness decays it with a cosine; the official code steps it down (x0.1 at
  epoch 120, x0.05 at 160, x0.01 at 200). Biases and BN parameters get no weight decay (harness groups);
- evaluation reads the backbone features (``embed``); the paper's k-NN uses the normalised 128-d f.
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
    dim: int = 128
    """Dimension of the L2-normalised embedding f (official ``--low-dim 128``: a linear layer on the
    pooled ResNet features, then L2 normalisation, models/resnet_cifar.py)."""
    temperature: float = 0.1
    """tau (official demo_seen.py ``--batch-t 0.1``; its README recommends 0.05-0.1)."""
    detach_weights: bool = True
    """Take the instance weights f_k as constants in every similarity, as the official BatchCriterion
    does (``x.t().data``); False: the gradient also flows through the weights (the equations alone)."""
    augment_instance_view: bool = False
    """False: x_i is the image itself and only x̂_i = T(x_i) is augmented (Sec. 3.2); True: both are drawn
    from T, as the official CIFAR data set class does (datasets/cifar.py)."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official demo_seen.py: scale=(0.2, 1.))."""
    optimizer: str = "sgd"
    """SGD with momentum (official demo_seen.py)."""
    base_lr: float = 0.06
    """lr 0.03 at batch 128 (official ``--lr 0.03``, README), i.e. 0.06 per 256 as the harness scales it."""
    weight_decay: float = 5e-4
    """Official demo_seen.py."""
    momentum: float = 0.9
    """Official demo_seen.py."""
    warmup_epochs: int = 0
    """No warm-up in the official code."""
    epochs: int = 300
    """Not stated in the paper as far as checked; the official demo_seen.py loops over epochs 0-300."""
    batch_size: int = 128
    """Official ``--batch-size 128`` (README: larger batches generally do better)."""
    sync_batchnorm: bool = False
    """The official code trains with DataParallel: BN statistics per GPU."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# k-NN figures are from `selfsup train invariant-spreading --set ...` runs, random init 0.839):
# - augment_instance_view True, as the official code: with the paper's plain instance view the 330 steps end
#   at 0.833, below random init; two draws from T give 0.908 (0.894 with detach_weights False);
# - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as SimCLR's small preset).
# Everything else is the paper's / official code's: tau 0.1, SGD at 0.03 per 128 images.
PRESETS = {"small": dict(augment_instance_view=True, min_scale=0.4)}


# --- augmentations (official demo_seen.py: crop, colour jitter, grayscale, flip) -----------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """[instance view x_i, augmented view x̂_i]. T: random resized crop, flip, colour jitter 0.4 (always),
    grayscale (p=0.2). Unless ``augment_instance_view``, x_i is the whole image (a square centre crop resized
    to ``image_size``: a crop of full area and ratio 1 falls back to it). Each takes a PIL image or uint8."""
    augmented = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
    if cfg.augment_instance_view:
        return [augmented, augmented]
    plain = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), antialias=True),  # deterministic
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
    return [plain, augmented]


# --- loss -----------------------------------------------------------------------------------------------


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


def invariant_spreading_loss(f: torch.Tensor, f_hat: torch.Tensor, temperature: float, detach_weights: bool = True) -> torch.Tensor:
    """J / m (Sec. 3.2). f: (N, D) features of the instances x_i, the softmax weights; f_hat: (N, D) those of
    their augmented copies x̂_i. Both are L2-normalised here. Under torch.distributed the weights are the
    global batch and the mean over ranks is the loss of the concatenated batch."""
    n = f.shape[0]
    f, f_hat = F.normalize(f, dim=1), F.normalize(f_hat, dim=1)
    weights, offset = gather_with_grad(f)  # (M, D): every instance f_k of the global batch
    if detach_weights:
        weights = weights.detach()  # official BatchCriterion: the second operand is .data
    rows = torch.arange(n, device=f.device)
    own = rows + offset  # column of each local instance among the weights
    # -log P(i | x̂_i): the augmented copy against every instance
    log_p_hat = F.log_softmax(f_hat @ weights.T / temperature, dim=1)  # (N, M)
    invariance = -log_p_hat[rows, own]  # (N,)
    # -sum_{i != j} log(1 - P(i | x_j)): row j holds P(i | x_j) over the instances i; k = j stays in the sum
    p = F.softmax(f @ weights.T / temperature, dim=1)  # (N, M)
    p = p.index_put((rows, own), torch.zeros((), dtype=p.dtype, device=p.device))  # drop i = j
    spreading = -torch.log1p(-p).sum(dim=1)  # (N,); P(i | x_j) <= 1/2 for unit features
    return (invariance + spreading).mean()  # J / m


# --- model ----------------------------------------------------------------------------------------------


class InvariantSpreading(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = nn.Linear(feature_dim, cfg.dim)  # the 128-d embedding layer (official low_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f = normalise(W g(x)), (N, dim)."""
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def forward(self, batch: dict) -> dict:
        x, x_hat = batch["views"][:2]  # (N, C, H, W): the instances and their augmented copies
        n = x.shape[0]
        f, f_hat = self.features(torch.cat([x, x_hat])).split(n)  # one pass, as the official code: (N, dim) each
        with torch.autocast(x.device.type, enabled=False):  # log(1 - P) in float32, also under AMP
            loss = invariant_spreading_loss(f.float(), f_hat.float(), self.cfg.temperature, self.cfg.detach_weights)
        with torch.no_grad():
            pos_sim = (f * f_hat).sum(dim=1).mean()
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (the harness's k-NN and probes; the paper's k-NN uses the normalised f)."""
        return self.backbone(x)


MODEL = InvariantSpreading


if __name__ == "__main__":
    f = F.normalize(torch.randn(8, 128), dim=1)
    print("random:", invariant_spreading_loss(f, torch.randn(8, 128), 0.1).item(),
          "aligned:", invariant_spreading_loss(f, f, 0.1).item())
