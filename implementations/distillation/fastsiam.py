"""FastSiam — Pototzky, Sultan, Schmidt-Thieme. "FastSiam: Resource-Efficient Self-supervised Learning on a
Single GPU". GCPR 2022 (DAGM German Conference on Pattern Recognition, LNCS 13485),
doi:10.1007/978-3-031-16788-1_4; no preprint found (arXiv:null). Catalog id: ``fastsiam``. Official code:
none released.

SimSiam (catalog ``simsiam``) computes each view's target from one other view; FastSiam averages the
targets of several views of the same image, which steadies the target and lets small batches converge
faster. With V = K + 1 views x_1..x_V of an image, z_i = f(x_i) (backbone + projection MLP, shared),
p_i = h(z_i) (prediction MLP) and D(p, z) = -(p / ||p||) . (z / ||z||),

    t_i = 1/K sum_{j != i} stopgrad(z_j)          (the target of view i: the mean of the other K)
    L   = 1/V sum_i D(p_i, t_i),                  averaged over the batch; minimum -1.

Every view is predicted once from the other K (``symmetric=True``); ``symmetric=False`` predicts view 1
only. With V = 2 the symmetric loss is SimSiam's Eq. 4 exactly.

Collapse: as in SimSiam, no negatives and no momentum encoder; the stop-gradient on the targets and the
predictor break the symmetry between the branches (SimSiam Sec. 4.1-4.2). Averaging K targets lowers
their variance but does not change that mechanism.

Distributed: each sample's loss uses only its own views, so the mean over equal shards is the loss of
the global batch and DDP's gradient averaging suffices. The paper trains on one GPU, so BN statistics
stay per device (``sync_batchnorm`` turns SyncBatchNorm on under torchrun on CUDA).

Sources: the paper's text was not accessible here (Springer chapter; no preprint found). Its abstract
gives the idea (a target from several views instead of one), the budget (single GPU, batch 32, 25 epochs)
and the SimSiam basis. The number of views (4: K = 3 target views per online view) and the arrangement in
which every view serves once as the online view follow lightly's FastSiam (``FastSiamTransform(K=3)``, its
example's loss); the first public reimplementation (faris-k/fastsiam-wafers) uses 4 views but one online
view (``symmetric=False``). Heads, optimizer and view recipe are SimSiam's (official code), not verified
against the FastSiam paper.

Deviations (from SimSiam's official code, whose parts this file takes):
- the projector's output fc has no bias: the official SimSiam keeps a frozen bias there, which the
  affine-free BN after it removes exactly;
- the Gaussian blur (p=0.5) needs a kernel size in torchvision: 10% of the side, odd (23 px at 224); it is
  dropped below 64 px (as SimCLR does on CIFAR-10, its App. B.9);
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
    num_views: int = 4
    """V = K + 1 views per image, K = 3 target views for each online view (lightly's
    ``FastSiamTransform(K=3)``; not verified in the paper's text)."""
    symmetric: bool = True
    """Every view predicts the mean of the other K (lightly's FastSiam); False: view 1 alone predicts the
    mean of the K others (faris-k/fastsiam-wafers)."""
    proj_hidden_dim: int = 2048
    """Width of the projection MLP's hidden fc layers (SimSiam Sec. 3; not verified for FastSiam)."""
    proj_dim: int = 2048
    """d, the dimension of z and p (SimSiam Sec. 3; not verified for FastSiam)."""
    pred_hidden_dim: int = 512
    """Bottleneck of the prediction MLP (SimSiam Sec. 3; not verified for FastSiam)."""
    fix_pred_lr: bool = True
    """Predictor at the peak rate, without decay (SimSiam Sec. 4.2, official ``--fix-pred-lr``; not
    verified for FastSiam)."""
    min_scale: float = 0.2
    """Smallest crop area fraction (SimSiam's official recipe; lightly's FastSiamTransform: 0.2)."""
    optimizer: str = "sgd"
    """SGD with momentum, as SimSiam (Sec. 3); not verified for FastSiam."""
    base_lr: float = 0.05
    """lr = base_lr x batch/256 (SimSiam Sec. 3); not stated in the abstract, not verified here."""
    weight_decay: float = 1e-4
    """SimSiam Sec. 3; not verified for FastSiam."""
    momentum: float = 0.9
    """SimSiam Sec. 3; not verified for FastSiam."""
    warmup_epochs: int = 0
    """SimSiam: cosine decay from the start (Sec. 3)."""
    epochs: int = 25
    """The abstract: on par with ImageNet weights after 25 epochs of pre-training."""
    batch_size: int = 32
    """The abstract: a batch of only 32 on a single GPU."""
    sync_batchnorm: bool = False
    """A single GPU (abstract): nothing to synchronise; under torchrun BN statistics stay per device."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64;
# the k-NN figures are from `selfsup train fastsiam --set ...` runs, random init 0.839):
# - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets);
# - base_lr 0.4 (lr 0.1 at batch 64): k-NN 0.892, linear 0.994. SimSiam's 0.05 x 64/256 = 0.0125 barely
#   moves the network in 330 steps (SimSiam itself: 0.822 at base_lr 0.05). Everything else is SimSiam's.
PRESETS = {"small": dict(min_scale=0.4, base_lr=0.4)}


# --- augmentations (SimSiam's official recipe for every view, as lightly's FastSiamTransform) -----------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """``num_views`` views from one distribution: crop (scale min_scale-1), flip, colour jitter (0.4, 0.4,
    0.4, 0.1) with p=0.8, grayscale p=0.2, blur p=0.5 (SimSiam's recipe; the flip moved forward, see
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
    return [v2.Compose(steps) for _ in range(cfg.num_views)]


# --- heads (SimSiam's: Sec. 3 and the official builder) ------------------------------------------------


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


def mean_targets(z: torch.Tensor) -> torch.Tensor:
    """t_i = 1/K sum_{j != i} stopgrad(z_j). z: (V, N, D) projections of the V views -> (V, N, D)."""
    z = z.detach()
    return (z.sum(dim=0, keepdim=True) - z) / (z.shape[0] - 1)


def fastsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """1/V' sum_{i <= V'} D(p_i, t_i), averaged over the batch; minimum -1. p: (V', N, D) predictions of
    the first V' views (V' = V: every view is online once; V' = 1: view 1 only), z: (V, N, D) projections
    of all V views."""
    t = mean_targets(z)[: p.shape[0]]  # (V', N, D), no gradient
    return -F.cosine_similarity(p, t, dim=-1).mean()  # mean over (V', N)


# --- model ----------------------------------------------------------------------------------------


class FastSiam(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.num_views < 2:
            raise ValueError(f"FastSiam needs at least 2 views (num_views={cfg.num_views})")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = prediction_mlp(cfg.proj_dim, cfg.pred_hidden_dim)

    def forward(self, batch: dict) -> dict:
        views = batch["views"]  # V tensors (N, C, H, W)
        if len(views) < 2:
            raise ValueError(f"FastSiam needs at least 2 views, got {len(views)}")
        z = torch.stack([self.projector(self.backbone(x)) for x in views])  # (V, N, D); BN per view
        online = z if self.cfg.symmetric else z[:1]
        p = torch.stack([self.predictor(zi) for zi in online])  # (V, N, D), or (1, N, D)
        loss = fastsiam_loss(p, z)
        with torch.no_grad():
            z_std = F.normalize(z[0], dim=1).std(dim=0).mean()  # ~1/sqrt(D) spread, 0 collapsed
        return {"loss": loss, "z_std": z_std}

    def param_groups(self) -> list[dict]:
        """The encoder on the schedule; the predictor at a fixed rate (SimSiam Sec. 4.2)."""
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        ids = {id(p) for p in predictor}
        encoder = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": encoder}, {"params": predictor, "fixed_lr": self.cfg.fix_pred_lr}]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features, before the projector (as SimSiam evaluates)."""
        return self.backbone(x)


MODEL = FastSiam


if __name__ == "__main__":
    z = torch.randn(4, 8, 256)
    print("random:", fastsiam_loss(torch.randn(4, 8, 256), z).item(), "aligned:", fastsiam_loss(mean_targets(z), z).item())
