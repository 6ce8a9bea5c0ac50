"""Deep CCA — Andrew, Arora, Bilmes, Livescu. "Deep Canonical Correlation Analysis". ICML 2013 (PMLR 28(3),
https://proceedings.mlr.press/v28/andrew13.html; no arXiv version), arXiv: none. Catalog id: ``deep-cca``.
Official code: none linked from the paper.

Two networks map paired views to outputs H1, H2 (N samples, o dimensions each; the paper writes them as
o x m matrices with one column per sample). With the centred outputs H1c = H1 - mean, H2c = H2 - mean (the
paper's "Deep CCA" section),

    S11 = H1c^T H1c / (N - 1) + r1 I,   S22 = H2c^T H2c / (N - 1) + r2 I,   S12 = H1c^T H2c / (N - 1),
    T   = S11^{-1/2} S12 S22^{-1/2},
    corr(H1, H2) = ||T||_tr = trace((T^T T)^{1/2}) = sum of the o singular values of T,

the total canonical correlation of the two outputs (the paper's case k = o; with k < o the sum of the top
k singular values, the paper's variant for fewer CCA components, ``top_k`` here). Both networks maximise
corr: the loss is -corr. The paper's closed-form gradient (same section), with T = U D V^T,

    dcorr/dH1 = (2 H1c D11 + H2c D12^T) / (N - 1),   D12 = S11^{-1/2} U V^T S22^{-1/2},
    D11 = -1/2 S11^{-1/2} U D U^T S11^{-1/2},

and symmetrically for H2; here autograd computes it (the tests check it against that formula and against
finite differences). The inverse square roots come from a float64 symmetric eigendecomposition, with a
backward of their own (Daleckii-Krein) that has no 1/(lambda_i - lambda_j) terms, so repeated eigenvalues
(e.g. directions where only the ridge is left) do not blow the gradient up.

Collapse: corr is invariant to any invertible linear map of either output and lies in [0, o]: the
whitening by S11^{-1/2}, S22^{-1/2} rules out both a constant output (its covariance is r I, T ~ 0, corr
~ 0, the worst value) and dimensional collapse (each canonical direction counts at most 1, so o
correlated directions are needed to reach o). The ridge r1, r2 keeps the whitening finite when a batch has
fewer samples than dimensions or an output loses rank.

Distributed: the covariances are statistics of the GLOBAL batch. The outputs of both views are
all-gathered with gradient (``gather_with_grad``), and every rank computes the same corr of the whole
batch. The gather's backward sums, for each rank's rows, the gradients of all world_size identical copies
of the loss, and DDP divides by world_size: the gradient equals one process on the concatenated batch.

Networks: the paper trains two separate networks, one per modality (left and right halves of MNIST digits;
acoustic and articulatory speech features). Here the two views are augmentations of the same image, so by
default one backbone is shared and each view has its own head f1, f2 (the two output networks of the paper,
Linear - BN - ReLU - Linear to o dimensions): a shared encoder is what the harness evaluates, and it sees
twice the data. ``separate_backbones=True`` gives view 2 a copy of the backbone (the paper's two networks
end to end); ``embed`` then uses view 1's.

Deviations:
- optimisation: the paper trains with full-batch L-BFGS (the objective does not decompose over samples),
  after layer-wise denoising-autoencoder pretraining; here mini-batch AdamW with the harness's
  warm-up and cosine schedule, from random initialisation: the covariances are estimated on each
  mini-batch, a biased estimate of corr that needs batches well above o (the stochastic DCCA of Wang et al.
  2015 uses large mini-batches for the same reason);
- data: two augmented views of one image instead of two modalities, and a shared backbone (see Networks);
- the networks: the paper's MLPs use its cube-root-like nonlinearity s(x) (s^3/3 + s = x); here the
  harness's backbone and a ReLU/BN head;
- the inverse square roots and corr run in float64 with autocast off (eigendecompositions have no
  bf16/fp16 kernels, and the whitening amplifies rounding in small eigenvalues);
- the heads' last Linear has no bias: centring removes it, so its exact gradient is 0 and what autograd
  gives is float noise, which AdamW would turn into a random walk of size lr per step;
- eigenvalues are clamped at 1e-12 before the inverse square root, so a ridge of 0 on a rank-deficient
  batch gives a large but finite value instead of NaN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    proj_dim: int = 50
    """o, the output dimension of each network: 50 for split MNIST, 112 for the XRMB speech data (the
    experiments' total-correlation tables)."""
    proj_hidden_dim: int = 2048
    """Hidden width of each head f_v: not stated in the paper (its networks are whole MLPs); the width of
    the other heads of this catalog."""
    top_k: int = 0
    """k, canonical correlations summed: 0 means all o (the paper's k = o case); 0 < k < o sums the
    top k singular values of T, the paper's variant."""
    r1: float = 1e-4
    """Ridge added to S11 ("r1 > 0", the "Deep CCA" section): its value for the experiments is not
    stated in the text available here (hyperparameters were tuned on development data); 1e-4 is the
    default of common reimplementations (e.g. the rcov of DCCAE-style code), not verified against the paper."""
    r2: float = 1e-4
    """Ridge added to S22, as r1."""
    separate_backbones: bool = False
    """Give view 2 its own copy of the backbone (the paper's two networks); default shared (see Networks)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop: not the paper's (it has no augmentations); SimCLR's."""
    optimizer: str = "adamw"
    """The paper uses full-batch L-BFGS, which the harness does not offer; AdamW, see Deviations."""
    base_lr: float = 4e-3
    """Per 256 images (lr 1e-3 at batch 64): not from the paper (L-BFGS has no learning rate)."""
    weight_decay: float = 1e-4
    """The paper's networks have an L2 penalty tuned on development data (value not stated); 1e-4 here."""
    warmup_epochs: int = 10
    """Not from the paper; linear warm-up, then cosine decay."""
    epochs: int = 100
    """Not from the paper (L-BFGS runs to convergence)."""
    batch_size: int = 1024
    """The paper's batch is the whole training set (full-batch L-BFGS); 1024 keeps the covariance estimate
    of o = 50 dimensions close to it."""
    sync_batchnorm: bool = True
    """BN in the heads over the global batch under torchrun, as the covariances."""


# Small-scale preset for CPU runs on the embedded digits (15 epochs at batch 64, small_cnn; k-NN of the
# backbone from `selfsup train deep-cca --set ...` runs, random init 83.9%, linear 98.6%):
# - proj_dim 64 with r1 = r2 = 1: a batch of 64 estimates the 64 x 64 covariances only up to rank 63, so
#   the ridge, not the sample, sets the whitening's scale in the weak directions: with r = 1 (the
#   outputs' own scale is free, the head has no final BN) the objective sits between CCA and maximising
#   the cross-covariance, and 64 directions cannot all be met by a few easy features (corr per dimension
#   0.57 at the end, against 0.63 for 32 at r = 0.1);
# - proj_hidden_dim 256: the heads' width at this scale;
# - warmup_epochs 1: 10 would be most of the run; min_scale 0.4: 8% crops of an 8x8 digit leave a blob;
# - base_lr: the default 4e-3 (lr 1e-3 at batch 64).
# Runs (settings -> k-NN, linear): proj_dim 16, r 1e-3 (the earlier preset) -> 83.9%, 97.8%; the same at
# base_lr 0.04 -> 79.2%, 98.3% (16 directions are reached with 16 easy ones, near-whitened by a ridge
# that is nothing beside the outputs' variance); proj_dim 32, r 0.1 -> 90.3%, 98.9%; proj_dim 64, r 1
# (this preset) -> 93.6%, 98.6%; proj_dim 64, r 10 -> 92.8%, 100.0%. One test image is 0.28%.
PRESETS = {"small": dict(proj_dim=64, proj_hidden_dim=256, r1=1.0, r2=1.0, warmup_epochs=1, min_scale=0.4)}


# --- augmentations ----------------------------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from one distribution (the paper's views are two modalities; here SimCLR's recipe): crop,
    flip, colour jitter (p=0.8), grayscale (p=0.2), blur (p=0.5) from 64 px. Each takes a PIL image or uint8 tensor."""
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


# --- heads ------------------------------------------------------------------------------------------


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """f_v: Linear - BN - ReLU - Linear to the o CCA outputs. The last Linear has no bias: the covariances
    centre the outputs, so a bias cannot change corr (see Deviations)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


# --- loss -------------------------------------------------------------------------------------------


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


class _InvSqrtm(torch.autograd.Function):
    """S^{-1/2} of a symmetric positive definite S by eigh. Backward (Daleckii-Krein):
    grad_S = U (L o (U^T G U)) U^T with L_ij = (f(l_i) - f(l_j)) / (l_i - l_j) for f = l^{-1/2}, which
    equals -1 / (sqrt(l_i) sqrt(l_j) (sqrt(l_i) + sqrt(l_j))): no division by eigenvalue gaps."""

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:
        lam, u = torch.linalg.eigh(s)  # (D,), (D, D)
        root = lam.clamp_min(1e-12).sqrt()  # (D,)
        ctx.save_for_backward(u, root)
        return (u / root) @ u.mT  # U diag(l^{-1/2}) U^T

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        u, root = ctx.saved_tensors
        loewner = -1.0 / (root[:, None] * root[None, :] * (root[:, None] + root[None, :]))  # (D, D)
        return u @ (loewner * (u.mT @ g @ u)) @ u.mT


def inv_sqrtm(s: torch.Tensor) -> torch.Tensor:
    """S^{-1/2} for a symmetric positive definite (D, D) matrix."""
    return _InvSqrtm.apply(s)


def total_correlation(h1: torch.Tensor, h2: torch.Tensor, r1: float, r2: float, top_k: int = 0) -> torch.Tensor:
    """corr(H1, H2) = ||T||_tr, the sum of T's singular values (all o, or the top k).
    h1, h2: (N, o) outputs of the two networks on N paired samples."""
    n, o = h1.shape
    h1c = h1 - h1.mean(dim=0)  # (N, o), centred
    h2c = h2 - h2.mean(dim=0)
    eye = torch.eye(o, dtype=h1.dtype, device=h1.device)
    s11 = h1c.mT @ h1c / (n - 1) + r1 * eye  # (o, o)
    s22 = h2c.mT @ h2c / (n - 1) + r2 * eye
    s12 = h1c.mT @ h2c / (n - 1)
    t = inv_sqrtm(s11) @ s12 @ inv_sqrtm(s22)  # (o, o)
    sv = torch.linalg.svdvals(t)  # (o,), descending
    return sv[:top_k].sum() if 0 < top_k < o else sv.sum()


def deep_cca_loss(h1: torch.Tensor, h2: torch.Tensor, r1: float, r2: float, top_k: int = 0) -> torch.Tensor:
    """-corr over the global batch. h1, h2: (n, o) this rank's outputs; the same value on every rank,
    computed in float64 and returned in h1's dtype (float32 for bf16/fp16)."""
    with torch.autocast(device_type=h1.device.type, enabled=False):
        all1, _ = gather_with_grad(h1)  # (N, o), N = n x world_size
        all2, _ = gather_with_grad(h2)
        corr = total_correlation(all1.double(), all2.double(), r1, r2, top_k)
        return (-corr).to(torch.promote_types(h1.dtype, torch.float32))


# --- model ------------------------------------------------------------------------------------------


class DeepCCA(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.top_k < 0 or cfg.top_k > cfg.proj_dim:
            raise ValueError(f"Deep CCA: top_k must be 0 (all) or 1..proj_dim={cfg.proj_dim}, got {cfg.top_k}")
        self.cfg = cfg
        self.backbone = backbone
        # view 2's network: its own copy (the paper's two networks) or the same encoder
        self.backbone2 = copy.deepcopy(backbone) if cfg.separate_backbones else None
        self.head1 = projection_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)  # f1
        self.head2 = projection_head(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)  # f2

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (n, C, H, W) each
        h1 = self.head1(self.backbone(x1))  # (n, o)
        encoder2 = self.backbone if self.backbone2 is None else self.backbone2
        h2 = self.head2(encoder2(x2))  # (n, o)
        loss = deep_cca_loss(h1, h2, self.cfg.r1, self.cfg.r2, self.cfg.top_k)
        k = self.cfg.top_k if 0 < self.cfg.top_k < self.cfg.proj_dim else self.cfg.proj_dim
        return {"loss": loss, "corr_per_dim": (-loss.detach()) / k}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The (view-1) encoder's features: the heads are the CCA projection, discarded as in the other
        methods of this catalog (the paper evaluates the outputs themselves, which are o-dimensional here)."""
        return self.backbone(x)


MODEL = DeepCCA


if __name__ == "__main__":
    h = torch.randn(256, 8)
    print("independent:", total_correlation(h, torch.randn(256, 8), 1e-4, 1e-4).item(),
          "identical:", total_correlation(h, h, 0.0, 0.0).item(), "(max 8)")
