"""EMP-SSL — Shengbang Tong, Yubei Chen, Yi Ma, Yann LeCun. "EMP-SSL: Towards Self-Supervised Learning in
One Training Epoch". arXiv preprint, 2023, arXiv:2304.03977. Catalog id: ``emp-ssl``. Official code:
tsb0601/EMP-SSL.

Extreme-Multi-Patch SSL: every image of a batch of B gives n fixed-size patches (random crops of one fixed
area fraction and aspect ratio 1, each with its own colour augmentation). The network (backbone +
projector) maps patch i of image j to z_ij, normalised to the unit sphere. Z_i = [z_i1; ...; z_iB] (B, d)
collects patch i of every image, and zbar_j = (1/n) sum_i z_ij is the mean patch embedding of image j.
The objective, maximised (we minimise its negative), is

    max  (1/n) sum_{i=1..n} [ R(Z_i) + lambda D(Z_i, Zbar) ],

    R(Z)          = 1/2 logdet( I_d + d / (B eps^2) Z^T Z )          (total coding rate, TCR)
    D(Z_i, Zbar)  = (1/B) sum_j cos(z_ij, zbar_j)                     (invariance)

with lambda = 200 and eps^2 = 0.2 (official ``--patch_sim 200``, ``--eps 0.2``, where ``--eps`` enters as
d / (B eps) and so plays the role of eps^2). By Sylvester's identity logdet(I_d + c Z^T Z) = logdet(I_B +
c Z Z^T); the smaller of the two matrices is used. zbar carries gradient (the official loss does not
detach it).

Collapse: R is the coding rate of the patch embeddings of one patch index over the batch, a function of
the spectrum of Z^T Z: with unit rows the eigenvalues lambda_k of Z^T Z sum to B, and sum_k log(1 + c
lambda_k) is smallest when all that mass sits on one eigenvalue. A collapsed embedding (every row the same
unit vector) gives the minimum R = 1/2 log(1 + d / eps^2), while B orthonormal rows (B <= d) give the
maximum for unit rows, R = (B/2) log(1 + d / (B eps^2)). Maximising R spreads the patches of different
images over many orthogonal directions; the invariance term pulls the patches of one image to their mean.
No negatives, predictor, stop-gradient or momentum encoder are needed.

Distributed: R is a logdet of the second-moment matrix Z^T Z of the GLOBAL batch (no sum of per-rank terms).
Each rank all-gathers its normalised embeddings with gradient (``gather_with_grad``, whose backward returns
to each rank the summed gradient of its own rows) and computes both terms on the whole (B_global, n, d)
tensor, so every rank holds the same, global loss; each rank's rows then receive the gradient of every
rank's copy of the loss, world_size times the loss's own, and DDP's averaging divides by world_size: the
gradient of one process on the concatenated batch. (The invariance term is per image and would need no
gather; it is computed on the gathered tensor so that its mean is over the global batch too.) The
official code runs on one machine with ``nn.DataParallel``, which computes the loss on the whole batch.

Views: the n patches are n views of the harness's view recipe, one v2 pipeline each (official
``ContrastiveLearningViewGenerator``): a random resized crop of fixed area ``patch_scale`` = 0.25 and
ratio 1 resized back to the image size, flip, colour jitter (0.4, 0.4, 0.4, 0.2) with p=0.8, grayscale
p=0.2, blur p=0.1 and solarisation p=0.1. All n B patches pass through the network as one batch, patch-
major as the official ``torch.cat(data)`` (one BN batch of n B rows).

Evaluation (``embed``): the official ``evaluate.py`` uses the bag-of-features model (the README credits
the intra-instance VICReg paper): an image is represented by the average over 128 augmented
patches of the projector's first-layer output (``pre_feature``: Linear + BN + ReLU, 4096-d), not by the
backbone on the whole image, since the network only ever saw patches. Here the patches are a fixed grid
(see Deviations); ``eval_grid = 0`` embeds the whole image instead and ``eval_features = "backbone"``
reads the backbone's features.

Sources: the paper's abstract; the objective above and its experimental setup (ResNet-18, at most 30
epochs, batch 100, LARS with eta 0.005, weight decay 1e-4, lambda = 200, eps^2 = 0.2), read in a
third-party transcription of the paper, not in the paper itself; the rest from the official code
(``main.py``: ``TotalCodingRate``, ``Similarity_Loss``, the optimizer; ``dataset/aug.py``;
``model/model.py``; ``evaluate.py``; README commands), which agrees with it. Equation and section numbers
of the paper were not verified and are therefore not cited.

Deviations:
- evaluation patches: a deterministic eval_grid x eval_grid grid of crops of area ``patch_scale``
  (4 x 4 = 16 by default), resized like the training patches, without colour augmentation, where the
  official evaluation averages 128 randomly augmented patches (training transform); a deterministic
  embedding keeps k-NN and probes reproducible and 16 patches keep it cheap;
- the optimizer: the harness's LARS (trust ratio eta ||w|| / ||g + wd w||, eta = 0.005 through
  ``param_groups``; biases and BN parameters without weight decay or adaptation, as the official
  ``exclude_bias_n_norm``), where the official LARSWrapper (solo-learn) clips the adapted rate at the base
  rate (``clip=True``) and wraps SGD with Nesterov momentum; the official cosine schedule has no warm-up,
  as here (warmup_epochs 0);
- normalisation by the data set's mean and std (the harness's) where the official recipe uses 0.5/0.5;
- the blur is dropped below 64 px (as SimCLR does for CIFAR-10, its App. B.9), where the official CIFAR
  recipe blurs 10% of the patches with PIL by radius sigma ~ U(0.1, 2); at 64 px and above a torchvision
  blur with a kernel of 10% of the side, odd; crops are resized with antialiased bilinear interpolation
  (the harness's batched crop) where the official CIFAR loader uses PIL's bilinear (bicubic on ImageNet);
- ``patch_size`` (the side a patch is resized to) may be smaller than the image, for CPU runs; the paper
  resizes every patch to the image size (the default, 0);
- the logdet is computed in float32 with autocast off (the official code runs under AMP).
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
    num_patches: int = 20
    """n, fixed-size patches (views) per image: 20 in the official README's CIFAR and ImageNet-100 commands
    (``--num_patches 20``; the script's default is 100, and the README also reports 200)."""
    patch_scale: float = 0.25
    """Area fraction of every patch, fixed, aspect ratio 1: official ``RandomResizedCrop(32, scale=(0.25,
    0.25), ratio=(1, 1))`` (16 x 16 of a 32 x 32 CIFAR image; on ImageNet-100 ``scale=(0.25, 0.25)`` at
    224 with the default ratio range)."""
    patch_size: int = 0
    """Side the patches are resized to; 0 is the image size, as officially (a 16-px patch is upscaled to
    32). A smaller side is a CPU-budget option (see Deviations)."""
    lambd: float = 200.0
    """lambda, the weight of the invariance term D: 200 in the paper's setup and the official ``--patch_sim``
    default (the TCR weight ``--tcr`` is 1)."""
    eps_sq: float = 0.2
    """eps^2 of the coding rate, R = 1/2 logdet(I + d / (B eps^2) Z^T Z): 0.2 in the paper's setup and the
    official ``--eps`` default, which the official TotalCodingRate divides by directly (d / (B eps)))."""
    proj_hidden_dim: int = 4096
    """Width of the projector's hidden layers (official ``encoder(hidden_dim=4096)``)."""
    proj_dim: int = 1024
    """d, the dimension of the normalised embeddings in the loss (official ``encoder(z_dim=1024)``)."""
    eval_grid: int = 4
    """Patches per side of the bag-of-features grid that ``embed`` averages; 0 embeds the whole image. Not
    stated in the paper: the official ``evaluate.py`` averages 128 random patches (``--test_patches``)."""
    eval_features: str = "pre_feature"
    """Which features ``embed`` averages: "pre_feature", the projector's first layer after BN + ReLU (the
    official ``evaluate.py``, ``z_pre``), or "backbone"."""
    optimizer: str = "lars"
    """LARS around SGD (official ``LARSWrapper(SGD(momentum=0.9, nesterov=True), eta=0.005, clip=True,
    exclude_bias_n_norm=True)``; see Deviations)."""
    lars_eta: float = 0.005
    """LARS trust coefficient: 0.005 in the paper's setup (official ``LARSWrapper(eta=0.005)``)."""
    base_lr: float = 0.768
    """Learning rate per 256 images: the official lr 0.3 at batch 100 (``--lr 0.3 --bs 100``), rescaled
    by the harness's rule lr = base_lr x batch / 256."""
    weight_decay: float = 1e-4
    """1e-4 in the paper's setup (official ``SGD(weight_decay=1e-4)``)."""
    momentum: float = 0.9
    """Official ``SGD(momentum=0.9)`` (Nesterov there, plain momentum here)."""
    warmup_epochs: int = 0
    """No warm-up: the official ``CosineAnnealingLR`` decays from the first step to 0 at the end of
    training."""
    epochs: int = 30
    """At most 30 in the paper's setup: official ``--epoch`` default and the README's 30-epoch CIFAR runs
    (its 1-epoch command passes ``--epoch 2``)."""
    batch_size: int = 100
    """Images per step: 100 in the paper's setup (official ``--bs`` default; each image brings n patches)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# k-NN figures are from `selfsup train emp-ssl --set ...` runs, random init of the same embedding beside it):
# - num_patches 6: the paper's 20 patches would make every step twenty small-CNN batches; 6 keep the
#   many-patch idea (more than the two views of the other presets) at the cost of ~1.5 full-size views;
# - patch_size 16: a patch of an 8x8 digit upscaled to 32 px holds at most ~5 original pixels a side, so
#   16 px lose nothing and cost a quarter of 32 px in the CNN;
# - patch_scale 0.4: 25% patches of an 8x8 digit are 4x4 of its pixels; 0.4 (side 20 of 32 px) as the other
#   small presets' min_scale 0.4;
# - projector 512-512-128 on the small CNN's 256 features: 4096-4096-1024 would cost ~8 times the CNN at
#   16 px; d = 2 B at batch 64, so that B orthogonal embeddings fit (d / (B eps^2) = 10);
# - eval_grid 3: nine 20-px patches at offsets 0, 6, 12 cover the image;
# everything else is the paper's, base_lr and LARS's eta included (lr 0.19 at batch 64, a relative step of
# ~1e-3 per layer, as the other presets' LARS rates).
# Runs (seed 0; training is the same network in all three, only the embedding read differs; each line
# trained vs random init of the same embedding; final loss -224.9, TCR ~44 of a 76.7 maximum, cos ~0.91):
# - this preset (pre_feature averaged over the 3x3 grid): k-NN 0.883 vs 0.697, linear 0.989 vs 0.967;
# - ``--set eval_features=backbone`` (backbone averaged over the grid): k-NN 0.833 vs 0.811, linear 0.983;
# - ``--set eval_features=backbone --set eval_grid=0`` (backbone, whole image, the other methods'
#   embedding): k-NN 0.861 vs 0.839, linear 0.992 vs 0.986.
# Not tuned further: the preset beats random init under every reading.
PRESETS = {"small": dict(num_patches=6, patch_size=16, patch_scale=0.4, proj_hidden_dim=512, proj_dim=128,
                         eval_grid=3)}


# --- augmentations (official dataset/aug.py: ContrastiveLearningViewGenerator) ----------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """n identical pipelines, one per patch: a crop of fixed area ``patch_scale`` and ratio 1 resized to
    ``patch_size`` (0: the image size, the default), flip, colour jitter (0.4, 0.4, 0.4, 0.2) with p=0.8,
    grayscale p=0.2, blur p=0.1 (from 64 px), solarisation p=0.1. Each takes a PIL image or a uint8 tensor."""
    if cfg.num_patches < 2:
        raise ValueError(f"EMP-SSL needs at least 2 patches per image (num_patches={cfg.num_patches})")
    if not 0 < cfg.patch_scale <= 1:
        raise ValueError(f"patch_scale is an area fraction in (0, 1], got {cfg.patch_scale}")
    size = cfg.patch_size or image_size
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(cfg.patch_scale, cfg.patch_scale), ratio=(1.0, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if image_size >= 64:  # a 23-px kernel at 224 px is about 10% of the side
        kernel = int(0.1 * size) // 2 * 2 + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.1))
    steps += [v2.RandomSolarize(threshold=128, p=0.1)]  # on uint8 values, as PIL's solarize
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps) for _ in range(cfg.num_patches)]


# --- heads ----------------------------------------------------------------------------------------


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Official ``encoder``: ``pre_feature`` = Linear + BN + ReLU, then ``projection`` = Linear + BN + ReLU +
    Linear, all with biases. Index 0 is the pre_feature block that the evaluation reads."""
    pre_feature = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
    projection = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                               nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(pre_feature, projection)


# --- loss -----------------------------------------------------------------------------------------


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


def total_coding_rate(z: torch.Tensor, eps_sq: float) -> torch.Tensor:
    """R(Z) = 1/2 logdet(I_d + d / (B eps^2) Z^T Z) of z (..., B, d), batched over leading dimensions;
    computed with the smaller Gram matrix (Sylvester: logdet(I_d + c Z^T Z) = logdet(I_B + c Z Z^T))."""
    b, d = z.shape[-2:]
    c = d / (b * eps_sq)
    gram = z @ z.transpose(-1, -2) if b <= d else z.transpose(-1, -2) @ z  # (..., min(B, d), min(B, d))
    eye = torch.eye(gram.shape[-1], device=z.device, dtype=z.dtype)
    return 0.5 * torch.logdet(eye + c * gram)


def emp_ssl_terms(z: torch.Tensor, eps_sq: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_i R(Z_i), mean_i D(Z_i, Zbar)) over the GLOBAL batch. z: (B, n, d) this rank's embeddings,
    patch i of image j at [j, i]; L2-normalised here and, under torch.distributed, gathered with gradient
    from every rank."""
    z = F.normalize(z, dim=-1)
    z_all, _ = gather_with_grad(z)  # (B_global, n, d)
    tcr = total_coding_rate(z_all.transpose(0, 1), eps_sq).mean()  # R(Z_i) per patch index i, averaged
    z_mean = z_all.mean(dim=1, keepdim=True)  # (B_global, 1, d), zbar_j, with gradient as officially
    sim = F.cosine_similarity(z_all, z_mean, dim=-1).mean()  # mean over images j and patches i
    return tcr, sim


def emp_ssl_loss(z: torch.Tensor, lambd: float = 200.0, eps_sq: float = 0.2) -> torch.Tensor:
    """-(1/n) sum_i [R(Z_i) + lambda D(Z_i, Zbar)] of the embeddings z (B, n, d), over the global batch."""
    tcr, sim = emp_ssl_terms(z, eps_sq)
    return -tcr - lambd * sim


# --- model ----------------------------------------------------------------------------------------


class EMPSSL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.eval_features not in ("pre_feature", "backbone"):
            raise ValueError(f"eval_features is 'pre_feature' or 'backbone', got {cfg.eval_features!r}")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    def forward(self, batch: dict) -> dict:
        views = batch["views"]  # n tensors (B, C, P, P), one per patch
        b, n = views[0].shape[0], len(views)
        x = torch.cat(views)  # (n B, C, P, P), patch-major as the official torch.cat(data)
        z = self.projector(self.backbone(x))  # (n B, d); one BN batch of n B rows
        z = z.view(n, b, -1).transpose(0, 1)  # (B, n, d)
        with torch.autocast(x.device.type, enabled=False):  # the logdet in float32, also under AMP
            tcr, sim = emp_ssl_terms(z.float(), self.cfg.eps_sq)
            loss = -tcr - self.cfg.lambd * sim
        return {"loss": loss, "tcr": tcr.detach(), "cos_sim": sim.detach()}

    def param_groups(self) -> list[dict]:
        """Weight decay and LARS adaptation (eta = ``lars_eta``) on weights; biases and BN parameters get
        neither (official ``exclude_bias_n_norm=True``)."""
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [{"params": decay, "weight_decay": self.cfg.weight_decay, "eta": self.cfg.lars_eta},
                {"params": no_decay, "weight_decay": 0.0, "lars": False}]

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation grid: (G^2, N, C, P, P) crops of area ``patch_scale`` at G evenly spaced offsets a
        side (G = ``eval_grid``), resized to the training patch side."""
        h, w = x.shape[-2:]
        g = self.cfg.eval_grid
        side = max(1, round(math.sqrt(self.cfg.patch_scale * h * w)))
        side_h, side_w = min(side, h), min(side, w)
        tops = [round(k * (h - side_h) / max(1, g - 1)) for k in range(g)]
        lefts = [round(k * (w - side_w) / max(1, g - 1)) for k in range(g)]
        crops = torch.stack([x[..., t:t + side_h, s:s + side_w] for t in tops for s in lefts])  # (G^2, N, C, s, s)
        size = self.cfg.patch_size or h
        if (side_h, side_w) != (size, size):
            flat = crops.flatten(0, 1)
            flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            crops = flat.view(*crops.shape[:3], size, size)
        return crops

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Bag of features (official ``evaluate.py``): the mean over the grid's patches of the projector's
        first-layer output (``eval_features = "pre_feature"``, (N, proj_hidden_dim)) or of the backbone's
        features ("backbone", (N, feature_dim)); with ``eval_grid = 0`` the same features of the whole image."""
        def features(t: torch.Tensor) -> torch.Tensor:
            f = self.backbone(t)
            return self.projector[0](f) if self.cfg.eval_features == "pre_feature" else f

        if self.cfg.eval_grid <= 0:
            return features(x)
        crops = self.patches(x)  # (G^2, N, C, P, P)
        g2, n = crops.shape[:2]
        return features(crops.flatten(0, 1)).view(g2, n, -1).mean(dim=0)  # (N, F)


MODEL = EMPSSL


if __name__ == "__main__":
    b, n, d = 16, 4, 32
    base = torch.randn(b, 1, d)
    print("aligned patches:", emp_ssl_loss(base.expand(b, n, d)).item(), "(cos term -lambda = -200)")
    print("noisy patches:", emp_ssl_loss(base + torch.randn(b, n, d)).item())
    print("collapsed:", emp_ssl_loss(torch.ones(b, n, d)).item(), "= -1/2 log(1 + d / eps^2) - 200")
