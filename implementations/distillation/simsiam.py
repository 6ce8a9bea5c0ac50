"""SimSiam — Chen, He. "Exploring Simple Siamese Representation Learning". CVPR 2021, arXiv:2011.10566.
Catalog id: ``simsiam``. Official code: facebookresearch/simsiam.

One encoder f (backbone + projection MLP) is shared by both branches; a prediction MLP h sits on one of
them. For two views x1, x2 of an image, z_i = f(x_i) and p_i = h(z_i), and with the negative cosine

    D(p, z) = - (p / ||p||_2) . (z / ||z||_2)                                     (Eq. 1)

the loss, averaged over the batch, is the symmetrised

    L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)),                        (Eq. 4)

whose minimum is -1. stopgrad(z) is z taken as a constant: the gradient reaches the encoder only
through p. Sec. 5 reads this as one step of an alternating (EM-like) optimisation in which the target
eta_x = f(x') is fixed while theta is updated.

Collapse: no negatives and no momentum encoder. The stop-gradient is what prevents it: without it the
loss reaches -1 at once and the per-dimension std of z / ||z|| falls to 0, i.e. every image gets the
same output (Sec. 4.1, Fig. 2). The predictor is needed too: without h (identity), or with h fixed at its
random initialisation, training fails (Sec. 4.2, Table 1). BN in the MLPs helps optimisation but does not
by itself prevent collapse (Sec. 4.4). ``stop_gradient=False`` reproduces the Sec. 4.1 ablation. In
training mode the affine-free BN at the projector's output keeps every channel of z at zero mean and unit
variance over the batch, so z cannot be exactly constant there: the collapse shows as a constant p, with
z crowding into its direction and the loss near -1 (the test of the ablation measures both).

Distributed: the loss is a mean of per-sample terms and uses no other sample of the batch, so the mean
over equal shards is the loss of the global batch and DDP's gradient averaging is all that is needed. BN
statistics are global with SyncBatchNorm, as the official code converts every BN (on CUDA here).

Predictor learning rate: the predictor keeps the peak rate throughout while the encoder follows the
cosine decay (Sec. 4.2, Table 1 "fixed lr"; the official ``--fix-pred-lr``, which its README's command
sets): ``param_groups()`` marks the predictor's group ``fixed_lr`` for the harness.

Deviations:
- the projector's output fc has no bias: the official code keeps a frozen bias there, which the
  affine-free BN after it removes exactly (batch and running means both contain it);
- the Gaussian blur (p=0.5) needs a kernel size in torchvision: 10% of the side, odd (23 px at 224), where
  the official loader blurs with PIL by radius sigma; it is dropped below 64 px (as SimCLR does on
  CIFAR-10, its App. B.9);
- the horizontal flip comes right after the crop instead of last: it commutes with the per-pixel colour
  operations, the distribution of views is unchanged, and the views can be made batched on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 2048
    """Width of the projection MLP's two hidden fc layers (Sec. 3, "Baseline settings": 2048-d; the
    official builder uses the backbone's width, 2048 for ResNet-50)."""
    proj_dim: int = 2048
    """d, the dimension of z and p: output of the projector, input and output of the predictor (Sec. 3;
    official ``--dim``)."""
    pred_hidden_dim: int = 512
    """Hidden width of the prediction MLP, a bottleneck 2048 -> 512 -> 2048 (Sec. 3; official
    ``--pred-dim``; ablated in the supplement)."""
    fix_pred_lr: bool = True
    """Keep the predictor at the peak rate, without the cosine decay (Sec. 4.2, Table 1 "fixed lr",
    68.1% vs 67.7%; official ``--fix-pred-lr``, set by the README's command)."""
    stop_gradient: bool = True
    """False removes the stop-gradient, the Sec. 4.1 ablation (Fig. 2), which collapses."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official main_simsiam.py: scale=(0.2, 1.))."""
    optimizer: str = "sgd"
    """SGD, no LARS needed (Sec. 3, "Optimizer")."""
    base_lr: float = 0.05
    """lr = base_lr x batch/256 with base_lr 0.05, cosine decay (Sec. 3)."""
    weight_decay: float = 1e-4
    """Sec. 3; the official code decays every parameter (biases and BN included), as here."""
    momentum: float = 0.9
    """Sec. 3."""
    warmup_epochs: int = 0
    """No warm-up: cosine decay from the start (Sec. 3; official ``adjust_learning_rate``)."""
    epochs: int = 100
    """The ablations' budget (Sec. 3; Table 4 also reports 200, 400, 800)."""
    batch_size: int = 512
    """Sec. 3 (Sec. 4.3: the method works from 64 to 4096)."""
    sync_batchnorm: bool = True
    """The official code converts every BN to SyncBatchNorm."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64;
# the k-NN figures are from `selfsup train simsiam --set ...` runs, random init 0.839):
# - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets);
# - heads 512 -> 512 -> 512, predictor 512 -> 128 -> 512 (the paper's 4:1 bottleneck) on the small CNN's
#   256-d features, base_lr 0.1: k-NN 0.847, linear 0.978. With the paper's 2048-d heads, base_lr
#   0.05/0.1/0.4 give 0.822/0.822/0.806; with 512-d heads base_lr 0.2 gives 0.844, with 256-d heads (64 in
#   the predictor) base_lr 0.1 gives 0.836. SimSiam learns slowly in 330 steps: FastSiam's four views
#   reach 0.892 in the same budget.
PRESETS = {"small": dict(min_scale=0.4, base_lr=0.1, proj_hidden_dim=512, proj_dim=512, pred_hidden_dim=128)}


# --- augmentations (official main_simsiam.py: the MoCo v2 recipe) ----------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from the same distribution: crop (scale 0.2-1), flip, colour jitter (0.4, 0.4, 0.4, 0.1)
    with p=0.8, grayscale p=0.2, blur p=0.5 (official main_simsiam.py; the flip moved forward, see
    Deviations). Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if image_size >= 64:
        kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads (Sec. 3, "Baseline settings"; official simsiam/builder.py) -------------------------------


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """3 fc layers, BN after each one including the output fc, ReLU after the hidden ones only (Sec. 3);
    the output BN has no affine parameters (official builder)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
    )


def prediction_mlp(dim: int, hidden_dim: int) -> nn.Module:
    """2 fc layers, a bottleneck: BN and ReLU on the hidden fc, neither on the output fc (Sec. 3, 4.4)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


# --- loss -----------------------------------------------------------------------------------------


def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """D(p, stopgrad(z)) of Eqs. 1 and 3, averaged over the batch. p, z: (N, D). With
    ``stop_gradient=False`` the gradient also flows into z (the Sec. 4.1 ablation)."""
    if stop_gradient:
        z = z.detach()
    return -F.cosine_similarity(p, z, dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                 stop_gradient: bool = True) -> torch.Tensor:
    """Eq. 4: 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)). All (N, D); minimum -1."""
    return 0.5 * negative_cosine(p1, z2, stop_gradient) + 0.5 * negative_cosine(p2, z1, stop_gradient)


def output_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the std of z / ||z|| over the batch: 0 when collapsed, about 1/sqrt(D)
    when the outputs spread over the sphere (Sec. 4.1, Fig. 2 middle)."""
    return F.normalize(z, dim=1).std(dim=0).mean()


# --- model ----------------------------------------------------------------------------------------


class SimSiam(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = prediction_mlp(cfg.proj_dim, cfg.pred_hidden_dim)

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        z1 = self.projector(self.backbone(x1))  # (N, D); each view is its own BN batch, as officially
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (N, D)
        loss = simsiam_loss(p1, p2, z1, z2, self.cfg.stop_gradient)
        with torch.no_grad():
            z_std = output_std(z1)
        return {"loss": loss, "z_std": z_std}

    def param_groups(self) -> list[dict]:
        """The encoder on the schedule; the predictor at a fixed rate (Sec. 4.2, ``--fix-pred-lr``). Weight
        decay on every parameter, as the official optimizer applies it."""
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        ids = {id(p) for p in predictor}
        encoder = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": encoder}, {"params": predictor, "fixed_lr": self.cfg.fix_pred_lr}]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features, before the projector (the official linear evaluation uses them)."""
        return self.backbone(x)


MODEL = SimSiam


if __name__ == "__main__":
    p, z = torch.randn(8, 2048), torch.randn(8, 2048)
    print("random:", simsiam_loss(p, p, z, z).item(), "aligned:", simsiam_loss(z, z, z, z).item())
