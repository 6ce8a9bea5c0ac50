"""VIbCReg — Lee, Aune. "Computer Vision Self-supervised Learning Methods on Time Series" (arXiv v1, 2021:
"VIbCReg: Variance-Invariance-better-Covariance Regularization for Self-Supervised Learning on Time Series").
arXiv preprint, 2021, arXiv:2109.00783. Catalog id: ``vibcreg``. Official code: https://github.com/ML4ITS/vibcreg
(``vibcreg/frameworks/vibcreg_.py``, ``vibcreg/losses/*.py``, ``vibcreg/normalization/iter_norm.py``,
``vibcreg/configs/frameworks/config_vibcreg.yaml``).

VICReg with two changes: a normalised ("better") covariance term, and an IterNorm whitening layer (Huang,
Zhou, Zhu, Liu, Shao, "Iterative Normalization: Beyond Standardization towards Efficient Whitening", CVPR
2019, arXiv:1904.03441) at the end of the projector. Two views x, x' of each sample go through the encoder f
and the projector h, z = h(f(x)); Z, Z' are the (n, d) batches and z^j is dimension j of Z over the batch:

    s(Z, Z') = 1/(n d) sum_i ||z_i - z'_i||^2                          invariance (VICReg's, as F.mse_loss)
    v(Z)     = 1/d sum_j max(0, 1 - sqrt(Var(z^j) + 1e-4))             variance (VICReg's, unbiased Var)
    Zc       = Z - mean(Z),   Zn^j = Zc^j / ||Zc^j||_2                 each centred column L2-normalised
    C~(Z)    = Zn^T Zn                                                 a (d, d) correlation matrix
    c~(Z)    = 1/d^2 sum_{i != j} C~(Z)_ij^2                           normalised covariance: mean over d^2
    loss     = lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c~(Z) + c~(Z')],   lambda = mu = 25, nu = 200

The projector is Linear-BN-ReLU, Linear-BN-ReLU, Linear, IterNorm. IterNorm splits the d features into G
groups of c = d / G and whitens each group over the batch with Newton's iterations for Sigma^{-1/2}
(Huang et al. Alg. 1), for one group X (c, m) of m samples:

    mu = mean(X),  Xc = X - mu,  Sigma = Xc Xc^T / m + eps I,  Sigma_N = Sigma / tr(Sigma)
    P_0 = I,  P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N   (k = 0..T-1),  W = P_T / sqrt(tr(Sigma))
    out = gamma * (W Xc) + beta                        (per-feature affine, initialised to 1 and 0)

P_T converges to Sigma_N^{-1/2} (the trace normalisation puts the eigenvalues in (0, 1], where the
iteration converges), so W -> Sigma^{-1/2}, the ZCA whitening matrix; with T = 5 it stops short of it:
Huang et al. use the iteration count to trade whitening against the stochasticity of batch statistics
(their SND analysis).
Running averages of mu and W (momentum 0.1) whiten in eval mode, as BN's running statistics.

Collapse: as in VICReg, the variance hinge keeps every dimension's std at 1 and the covariance term
decorrelates the dimensions. Normalising the covariance makes the term a function of correlations in
[-1, 1], independent of the embedding's scale, so that its weight (nu = 200 against VICReg's 1 on a sum over
d) does not have to be retuned with the variance; the whitening layer hands the loss already decorrelated
groups, which speeds up the decorrelation that the loss then maintains across groups.

Distributed: every statistic is one of the GLOBAL batch. The loss all-gathers both views' embeddings with
gradient (``gather_with_grad``) and every rank computes the loss of the concatenated batch. IterNorm computes
batch statistics too: in training it all-gathers its input with gradient and whitens this rank's rows with
the mean and W of the global batch, so that its running buffers are the same on every rank and the
gradient through the statistics reaches every rank's rows. Each rank's gradient is world_size times the
single-process one (the gather's backward sums the identical gradients of all ranks), and DDP's averaging
cancels the factor. The shared ddp check strips BatchNorm layers only (``_BatchNorm`` subclasses); IterNorm
is not one and is checked with its gather and its running buffers, in 2 groups of 4 features (its Case: with
64 groups the 8-d check embedding would be standardised per feature, not whitened). In float64 two ranks
equal one process to 1e-13 in loss, gradients and buffers. The projector's BN layers are global with
SyncBatchNorm (``sync_batchnorm``), as the harness converts them on CUDA.

Deviations:
- Modality: the paper trains a 1-D ResNet on time series (UCR, UEA, PTB-XL) with random crop, amplitude
  resizing and vertical shift. Here it runs on images with VICReg's image recipe (VICReg App. C.1: crop,
  flip, colour jitter 0.8, grayscale 0.2, blur 0.5, solarisation 0.1), which the harness batches on the
  device; the loss and the projector are the paper's.
- The projector's last Linear has no bias: IterNorm subtracts the batch mean, so the bias cannot change the
  output in training; its gradient is rounding noise, which AdamW would turn into a random walk of size lr.
  For the same reason IterNorm keeps its affine scale but not its shift beta (official ``affine=True``): every
  term of the loss is blind to a shift common to both views (the invariance sees z - z'), so beta's gradient
  is zero up to rounding.
- The hidden Linears have no bias (official: ``nn.Linear`` with bias): each is followed by BN, which subtracts
  the batch mean, so the bias is redundant (BN's shift replaces it) and its gradient is rounding noise.
- IterNorm's backward is autograd through the T iterations: the same gradient as Huang et al.'s hand-written
  backward (their Alg. 1's backward pass; it saves memory, which these widths do not need). IterNorm computes
  in float64 with autocast off (official: float32) and returns float32 (float64 for a float64 input):
  the uncoupled Newton iteration multiplies rounding errors (``whitening_matrix``), and centring features
  whose mean exceeds their spread cancels digits. The cost is small: G products of (c, N) by (N, c) and
  T cubes of c x c matrices per view.
- Schedule: the harness's cosine decay to 0 with ``warmup_epochs`` 0 (the official CosineAnnealingLR over
  the run, no warm-up); the rate scales with the batch (lr = base_lr x batch / 256), the official code sets
  it absolutely (1e-3 at its batch of 256, the same value).
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
    lambd: float = 25.0
    """Invariance coefficient lambda (official ``lambda_vibcreg: 25.``, ``config_vibcreg.yaml``; VICReg's)."""
    mu: float = 25.0
    """Variance coefficient mu (official ``mu_vibcreg: 25.``), on the SUM of the two branches' terms
    (official ``vibcreg_var_loss``)."""
    nu: float = 200.0
    """Normalised-covariance coefficient nu (official ``nu_vibcreg: 200.``), on the sum of both branches."""
    gamma: float = 1.0
    """Target std of each dimension (official ``FcE_scale = 1.``, VICReg's gamma)."""
    eps: float = 1e-4
    """Added to the variance under the square root (official ``vibcreg_var_loss``; VICReg's)."""
    proj_hidden_dim: int = 4096
    """Width of the projector's two hidden layers (official ``proj_hid_vibcreg: 4096``)."""
    proj_dim: int = 4096
    """Embedding dimension d (official ``proj_out_vibcreg: 4096``)."""
    iternorm_groups: int = 64
    """Groups G of IterNorm, c = d / G features each (official ``normalization_layer(..., num_groups_IterN=64)``,
    ``backbone/resnet.py``; group sizes rounded as the official ``IterNorm``)."""
    iternorm_iters: int = 5
    """Newton iterations T of IterNorm (official ``IterNorm(..., T=5)``; Huang et al.'s default)."""
    iternorm_eps: float = 1e-5
    """Added to the diagonal of each group's covariance (official ``IterNorm`` default)."""
    iternorm_momentum: float = 0.1
    """Momentum of IterNorm's running mean and whitening matrix (official ``IterNorm`` default)."""
    min_scale: float = 0.08
    """Smallest crop area fraction: VICReg's image recipe (VICReg App. C.1); the paper's crops are of series."""
    blur_prob: float = 0.5
    """Gaussian-blur probability (VICReg App. C.1), used from 64 px up."""
    solarize_prob: float = 0.1
    """Solarisation probability (VICReg App. C.1)."""
    optimizer: str = "adamw"
    """AdamW (official ``learn_representations.py``: ``torch.optim.AdamW``)."""
    base_lr: float = 1e-3
    """lr per 256 samples: the official 1e-3 at its batch of 256 (``configs/train/config_train.yaml``)."""
    weight_decay: float = 1e-5
    """Official ``weight_decay: 0.00001`` (``config_train.yaml``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's defaults; the official code does not set them."""
    warmup_epochs: int = 0
    """None: the official schedule is CosineAnnealingLR from the first step (``learn_representations.py``)."""
    epochs: int = 100
    """Official ``n_epochs: 100`` (``config_train.yaml``)."""
    batch_size: int = 256
    """Official ``batch_size: 256`` (``configs/datasets/config_ucr.yaml``)."""
    sync_batchnorm: bool = True
    """Not stated in the paper; the official code trains on one device, where BN sees the whole batch."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 32 px, small_cnn, 15 epochs
# at batch 64 = 330 steps; random-init k-NN 83.9%):
# - proj_hidden_dim, proj_dim 1024: three 4096-wide layers would cost ~34M multiply-adds per image, several
#   times the small CNN; with G = 64 groups IterNorm whitens groups of 16 features over the 64 samples of a
#   batch (the official 4096 / 64 = 64 features over 256 samples: the same ratio of samples to features);
# - base_lr 4e-3: lr = 1e-3 at batch 64, the official absolute rate, which the official code does not scale
#   with the batch;
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets).
# Everything else is the official setting (no warm-up). `selfsup train vibcreg`: k-NN 93.3% (linear 98.9%)
# with biased hidden Linears, an IterNorm shift and a float32 IterNorm; 93.1% (linear 98.1%) as the file is
# now. No other values were tried.
PRESETS = {"small": dict(proj_hidden_dim=1024, proj_dim=1024, base_lr=4e-3, min_scale=0.4)}


# --- augmentations -----------------------------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two identical pipelines of VICReg's image recipe (App. C.1): crop, flip, colour jitter (p=0.8),
    grayscale (p=0.2), blur (from 64 px), solarisation. The paper's time-series augmentations have no image
    counterpart (see Deviations). Each view takes a PIL image or a uint8 tensor."""

    def make() -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:  # a 23-px kernel at 224 px is about 10% of the side
            kernel = int(0.1 * image_size) // 2 * 2 + 1
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=cfg.blur_prob))
        steps += [v2.RandomSolarize(threshold=128, p=cfg.solarize_prob)]  # on uint8 values, before the conversion
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    return [make(), make()]


# --- distributed helper (byte-identical to simclr.py) --------------------------------------------


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


# --- IterNorm (Huang et al. 2019, Alg. 1) --------------------------------------------------------


def iternorm_group_size(num_features: int, num_groups: int) -> int:
    """Features per group c: ceil(d / G), halved until it divides d (the official ``IterNorm`` rule), so that
    d = 8 with G = 64 gives c = 1 (per-feature standardisation) and d = 4096 gives c = 64."""
    c = (num_features - 1) // num_groups + 1
    while num_features % c:
        c //= 2
    return c


def whitening_matrix(xc: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """W ~ Sigma^{-1/2} by T Newton iterations (Alg. 1). xc: (G, c, m) centred groups -> (G, c, c).

    The iteration converges from P_0 = I, but once converged it is not stable in finite precision: an error
    in the direction of eigenvalues (a_i, a_j), r = a_j / a_i, is multiplied by 1 - (sqrt(r) + r) / 2 per
    step, which exceeds 1 in size for r > ~2.4. A small T, as the paper's 5, stops before rounding errors grow."""
    g, c, m = xc.shape
    eye = torch.eye(c, dtype=xc.dtype, device=xc.device).expand(g, c, c)
    sigma = eps * eye + xc @ xc.transpose(1, 2) / m  # (G, c, c)
    r_tr = 1.0 / sigma.diagonal(dim1=1, dim2=2).sum(-1).view(g, 1, 1)  # 1 / tr(Sigma)
    sigma_n = sigma * r_tr  # eigenvalues in (0, 1]
    p = eye
    for _ in range(iters):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
    return p * r_tr.sqrt()


class IterNorm(nn.Module):
    """Group-wise whitening of (N, d) features over the batch: the global batch under torch.distributed."""

    def __init__(self, num_features: int, num_groups: int = 64, iters: int = 5, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, shift: bool = True):
        super().__init__()
        self.num_features, self.iters, self.eps, self.momentum = num_features, iters, eps, momentum
        self.group_size = iternorm_group_size(num_features, num_groups)
        self.num_groups = num_features // self.group_size
        g, c = self.num_groups, self.group_size
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine and shift else None
        self.register_buffer("running_mean", torch.zeros(g, c, 1))
        self.register_buffer("running_wm", torch.eye(c).expand(g, c, c).clone())

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.T.reshape(self.num_groups, self.group_size, -1)  # (N, d) -> (G, c, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)  # the output's: bf16/fp16 -> float32
            x = x.double()  # the iteration amplifies rounding errors (see whitening_matrix)
            local = self._groups(x)  # (G, c, n)
            if self.training:
                full, _ = gather_with_grad(x)  # (N_global, d): the statistics of the global batch
                xg = self._groups(full)  # (G, c, N_global)
                mean = xg.mean(-1, keepdim=True)  # (G, c, 1)
                wm = whitening_matrix(xg - mean, self.iters, self.eps)  # (G, c, c)
                with torch.no_grad():  # the same global statistics on every rank
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_wm.lerp_(wm.detach().to(self.running_wm.dtype), self.momentum)
            else:
                mean, wm = self.running_mean.to(x.dtype), self.running_wm.to(x.dtype)
            out = (wm @ (local - mean)).reshape(self.num_features, n).T.to(dtype)  # (n, d)
            if self.weight is not None:
                out = out * self.weight
            if self.bias is not None:
                out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.num_groups}x{self.group_size}, T={self.iters}, eps={self.eps}"


def projector(in_dim: int, hidden_dim: int, out_dim: int, cfg: Config = Config()) -> nn.Sequential:
    """h: 2 x [Linear - BN - ReLU], Linear, IterNorm (official ``Projector`` with
    ``add_IterN_at_the_last_in_proj_vibcreg: True``; the Linears without bias and IterNorm without its
    affine shift, see Deviations)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        IterNorm(out_dim, cfg.iternorm_groups, cfg.iternorm_iters, cfg.iternorm_eps, cfg.iternorm_momentum, shift=False),
    )


# --- loss -----------------------------------------------------------------------------------------


def invariance_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """s(Z, Z'): the mean squared difference over all n d entries, as VICReg's Alg. 1 and code compute it."""
    return F.mse_loss(z1, z2)


def variance_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """v(Z) = mean_j max(0, gamma - sqrt(Var(z^j) + eps)), unbiased variance (VICReg Eqs. 1-2). z: (N, D)."""
    std = torch.sqrt(z.var(dim=0) + eps)  # (D,)
    return F.relu(gamma - std).mean()


def normalized_covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """c~(Z): the squared off-diagonal entries of the correlation matrix of Z, summed and divided by D^2
    (the mean over all D^2 entries with the diagonal zeroed, official ``VIbCRegCovLoss``). z: (N, D)."""
    d = z.shape[1]
    zn = F.normalize(z - z.mean(dim=0), p=2, dim=0)  # (N, D): each centred column of unit L2 norm
    corr = zn.T @ zn  # (D, D), ones on the diagonal (zeros for a constant column)
    off = corr.flatten()[:-1].view(d - 1, d + 1)[:, 1:]  # (D - 1, D): the off-diagonal entries, a view
    return off.pow(2).sum() / (d * d)


def vibcreg_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 25.0, mu: float = 25.0, nu: float = 200.0,
                 gamma: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, the three unweighted terms) on the global batch. z1, z2: (N, D) embeddings of the two views on
    this rank; under torch.distributed every rank returns the loss of the concatenated batch."""
    z1, _ = gather_with_grad(z1)  # (N_global, D)
    z2, _ = gather_with_grad(z2)
    inv = invariance_loss(z1, z2)
    var = variance_loss(z1, gamma, eps) + variance_loss(z2, gamma, eps)  # summed (official vibcreg_var_loss)
    cov = normalized_covariance_loss(z1) + normalized_covariance_loss(z2)
    loss = lambd * inv + mu * var + nu * cov
    return loss, {"invariance": inv, "variance": var, "covariance": cov}


# --- model ----------------------------------------------------------------------------------------


class VIbCReg(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg)

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        z1 = self.projector(self.backbone(x1))  # (N, proj_dim), whitened in groups
        z2 = self.projector(self.backbone(x2))
        c = self.cfg
        loss, terms = vibcreg_loss(z1, z2, c.lambd, c.mu, c.nu, c.gamma, c.eps)
        with torch.no_grad():
            std = z1.std(dim=0).mean()  # local batch; a value near 0 means collapse
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, "std": std}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation y = f(x): the paper evaluates the encoder's output, the projector is dropped."""
        return self.backbone(x)


MODEL = VIbCReg


if __name__ == "__main__":
    z = torch.randn(256, 64)
    white = IterNorm(64, num_groups=4).train()(z @ torch.randn(64, 64))
    print("IterNorm: max |cov - I| within groups of 16:",
          max((torch.cov(g.T, correction=0) - torch.eye(16)).abs().max().item() for g in white.split(16, dim=1)))
    print("random:", vibcreg_loss(z, torch.randn(256, 64))[0].item(), "identical:", vibcreg_loss(z, z)[0].item(),
          "collapsed:", vibcreg_loss(torch.ones(256, 64), torch.ones(256, 64))[0].item())
