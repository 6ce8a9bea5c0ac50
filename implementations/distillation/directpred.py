"""DirectPred — Tian, Chen, Ganguli. "Understanding self-supervised Learning Dynamics without Contrastive
Pairs". ICML 2021, arXiv:2102.06810. Catalog id: ``tian-2021-understanding``.
Official code: https://github.com/facebookresearch/luckmatters/tree/main/ssl (``real-dataset/byol_trainer.py``,
run with ``trainer.predictor_reg=corr``, the command in ``real-dataset/README.md``).

BYOL with a linear predictor W_p that is never trained: it is set from the statistics of its own input.
An online network (encoder + projector) gives f = z = g(h(v)) for a view v; an EMA target gives z'. With
the normalised regression loss of BYOL, symmetrised over the two views,

    L = sum over (v, v') in {(x1, x2), (x2, x1)} of  || W_p z / ||W_p z|| - z' / ||z'|| ||^2
      = sum of  2 - 2 cos(W_p z, z'),

the predictor's input correlation is tracked with a moving average and eigen-decomposed (the paper's
Eqs. 18-19, as the official README numbers them):

    F <- rho F + (1 - rho) E_B[f f^T],     F = U diag(s) U^T,
    p_j = sqrt(max(s_j, 0) / max_k s_k) + eps,     W_p = U diag(p) U^T.

E_B averages over both views of the batch (2N vectors); the first update sets F = E_B[f f^T]. p_j is
written as the official ``compute_w_corr`` computes it (``balance_type=boost_scale``): divided by
max_k sqrt(s_k), it is sqrt(s_j) + eps max_k sqrt(s_k), and the loss does not change when W_p is scaled
(cos is scale-free). So W_p is symmetric PSD with the eigenvectors of F and eigenvalues in [eps, 1 + eps]:
the square root of the input correlation, normalised, with weak eigen-directions lifted by eps. The target
receives no gradient and follows the online network, xi <- tau xi + (1 - tau) theta, after every step with
a constant tau (official ``trainer.m``; no schedule).

Order of updates, as in the official trainer: in each step the forward uses the W_p set after the previous
step (the first step uses W_p at its random initialisation, drawn as ``nn.Linear`` draws its weight);
E_B[f f^T] is computed from this step's (detached) online outputs; after the optimizer step F takes the
EMA update and, every ``freq`` steps (the first included), W_p is recomputed from F; then the target's EMA.
Here the batch statistic is computed in ``forward`` and applied in ``on_step_end``, so a forward that is not
followed by a step leaves F alone; the official code adds it to F inside the forward, and reads F only
after the step, so the result is the same.

Collapse: no negatives. As in BYOL the stop-gradient and the slow target keep the two branches from meeting
at a constant. The paper's analysis of linear networks shows a trained predictor's eigenspace aligning with
that of F, its eigenvalues growing with F's; DirectPred imposes that alignment directly instead of waiting
for gradient descent to find it. eps keeps weak directions alive: with eps = 0 a direction whose eigenvalue
is 0 gets p_j = 0, and since W_p is symmetric the loss then sends no gradient into z along it.

Distributed: the loss is per sample, so DDP's gradient averaging gives the global batch's gradient. F must
be the correlation of the global batch so that W_p is the same on every rank: the sum of f f^T and the
number of vectors are all-reduced (one collective) and divided, and the eigen-decomposition of the
identical F gives an identical W_p everywhere. BN statistics are global with SyncBatchNorm (the official
code trains on one GPU, i.e. with whole-batch statistics).

Deviations:
- W_p is a buffer, not a parameter: no optimizer ever touches it. The official trainer keeps it in an SGD
  optimizer and overwrites it after every step; with ``freq = 1`` (the README's command, the default here)
  the SGD step is always overwritten, so the two agree; with ``freq > 1`` the official trainer also trains
  W_p by gradient between the direct updates, while here it stays as last set;
- the target starts as a copy of the online network, as in BYOL; in the official trainer the copy
  (``initializes_target_network``) is commented out, so its target starts from its own random weights;
- F is eigen-decomposed with the symmetric solver in float64 (``torch.linalg.eigh``), where the official code
  uses the general ``torch.eig`` in float32 and keeps the real part; for a symmetric F they agree, and
  float64 keeps every rank's W_p equal to rounding;
- the target's BN running statistics are copied from the online network (``ema_update``, as in byol.py);
  the official trainer leaves them to the target's own forwards. Training-mode BN normalises with the
  batch's statistics, so the loss is the same;
- the views use the harness's per-channel normalisation (the official STL-10 pipeline does not normalise),
  and the blur (always applied there, kernel 10% of the side) is dropped below 64 px, as the official
  CIFAR-10 recipe drops it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 512
    """Hidden width of the projector (official ``config/byol_config.yaml``: ``network.projection_head.
    mlp_hidden_size``; the paper's STL-10 / CIFAR-10 setting with ResNet-18)."""
    proj_dim: int = 128
    """d, the dimension of z and the size of the d x d predictor W_p (official ``projection_size``)."""
    rho: float = 0.3
    """Weight of the old estimate in F <- rho F + (1 - rho) E_B[f f^T] (official ``trainer.dyn_lambda=0.3``
    in the README's DirectPred command, which calls it rho of Eqs. 18-19)."""
    eps: float = 0.01
    """Added to every normalised sqrt-eigenvalue p_j (official ``trainer.dyn_eps=0.01`` in the README's
    command; the maintainer's answer in luckmatters issue #5 confirms that ``dyn_eps`` is the paper's eps)."""
    freq: int = 1
    """W_p is recomputed from F every ``freq`` steps (official ``trainer.predictor_freq=1`` in the README's
    command); F itself is updated every step."""
    tau: float = 0.996
    """Constant EMA rate of the target (official ``trainer.m: 0.996``; no schedule in the official trainer)."""
    jitter: float = 1.0
    """Colour-jitter strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8 (official
    ``data/transforms.py`` for STL-10, ``aug.jitter: 1``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official: torchvision's default scale)."""
    constant_lr: bool = True
    """No learning-rate schedule: the official trainer keeps the SGD rate constant. ``param_groups()``
    marks the group ``fixed_lr`` so that the harness skips its warm-up and cosine decay."""
    optimizer: str = "sgd"
    """SGD (official ``use_optimizer: sgd``)."""
    base_lr: float = 0.06
    """0.03 at batch 128 (official ``optimizer.params.lr``), i.e. 0.06 per 256 images in the harness's
    linear scaling."""
    weight_decay: float = 4e-4
    """Official ``optimizer.params.weight_decay: 0.0004``, applied to every parameter as the official
    optimizer does (biases and BN included)."""
    momentum: float = 0.9
    """Official ``optimizer.params.momentum``."""
    warmup_epochs: int = 0
    """No warm-up in the official trainer."""
    epochs: int = 100
    """Official ``trainer.max_epochs=100`` in the README's command (STL-10)."""
    batch_size: int = 128
    """Official ``trainer.batch_size``."""
    sync_batchnorm: bool = True
    """The official trainer runs on one GPU: BN sees the whole batch, as SyncBatchNorm gives under DDP."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64;
# k-NN from `selfsup train tian-2021-understanding --set ...` with the 512/128 heads, constant rate,
# random init 0.839):
# - tau 0.99: with 0.996 the target would barely leave its initialisation in 330 steps (as BYOL's preset);
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets);
# - jitter 0.5: the official CIFAR-10 recipe for 32-px images, ColorJitter(0.4, 0.4, 0.4, 0.1); with the
#   STL-10 strength (jitter 1, eps 0.01) k-NN 0.700, with jitter 0.5 0.781;
# - eps 0.3: the weak eigen-directions of F need a larger lift in so short a run: eps 0.01 / 0.1 / 0.3 give
#   0.781 / 0.842 / 0.864 (jitter 0.5, base_lr 0.2);
# - base_lr 0.2 (0.05 at batch 64, constant): base_lr 0.4 gives 0.725 at eps 0.1 (0.842 at 0.2).
PRESETS = {"small": dict(tau=0.99, min_scale=0.4, jitter=0.5, eps=0.3, base_lr=0.2)}


# --- augmentations (official real-dataset/data/transforms.py, the STL-10 recipe) ----------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from one distribution: crop, flip, colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8,
    grayscale p=0.2, blur with sigma in (0.1, 2) and a kernel of 10% of the side, always (official STL-10
    pipeline; dropped below 64 px, see Deviations). Each view is one v2 pipeline; it takes a PIL image or a
    uint8 tensor."""
    s = cfg.jitter
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if image_size >= 64:
        kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd (9 px at STL-10's 96 px)
        steps.append(v2.GaussianBlur(kernel, sigma=(0.1, 2.0)))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads ----------------------------------------------------------------------------------------


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear - BN - ReLU - Linear with a BN without affine parameters (official ``MLPHead`` with
    ``projector_params``: ``has_bn_affine: false``, biases on)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim, affine=False), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


# --- the predictor from the correlation -----------------------------------------------------------


@torch.no_grad()
def batch_correlation(f: torch.Tensor) -> torch.Tensor:
    """E_B[f f^T] over the global batch: f (M_local, D), detached; the sum of outer products and the count
    are all-reduced over ranks in one collective. Returns (D, D) in float32."""
    f = f.detach().float()
    with torch.autocast(f.device.type, enabled=False):  # the statistic in float32, also under AMP
        stats = torch.cat([(f.T @ f).flatten(), f.new_tensor([len(f)])])  # (D*D + 1,)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    d = f.shape[1]
    return stats[:-1].view(d, d) / stats[-1]


@torch.no_grad()
def predictor_from_correlation(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """W_p = U diag(p) U^T with F = U diag(s) U^T and p_j = sqrt(max(s_j, 0) / max_k s_k) + eps, at least
    1e-4 (Eqs. 18-19; official ``compute_w_corr`` with ``balance_type=boost_scale``, ``dyn_convert=2``).
    corr: (D, D) symmetric. Returns (D, D) in corr's dtype."""
    s, u = torch.linalg.eigh(corr.double())  # ascending eigenvalues, orthonormal eigenvectors (columns)
    s_max = s.max().clamp_min(torch.finfo(torch.float64).tiny)  # F = 0 gives W_p = eps I, not NaN
    p = ((s.clamp_min(0) / s_max).sqrt() + eps).clamp_min(1e-4)  # (D,)
    w = (u * p) @ u.T  # U diag(p) U^T
    return ((w + w.T) / 2).to(corr.dtype)  # exactly symmetric


# --- loss -----------------------------------------------------------------------------------------


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) averaged over the batch. p: (N, D) predictions, z: (N, D) targets (no grad)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def directpred_loss(p1: torch.Tensor, p2: torch.Tensor, z1_t: torch.Tensor, z2_t: torch.Tensor) -> torch.Tensor:
    """Symmetrised: view-1 prediction vs view-2 target plus the swap (official ``update``). All (N, D)."""
    return regression_loss(p1, z2_t) + regression_loss(p2, z1_t)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


# --- model ----------------------------------------------------------------------------------------


class DirectPred(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.freq < 1:
            raise ValueError(f"freq must be at least 1, got {cfg.freq}")
        self.cfg = cfg
        self.online = nn.Sequential(backbone, projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim))
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        d = cfg.proj_dim
        bound = 1 / math.sqrt(d)  # nn.Linear's default weight init, as the official predictor starts
        self.register_buffer("predictor_weight", torch.empty(d, d).uniform_(-bound, bound))  # W_p (D, D)
        self.register_buffer("corr", torch.zeros(d, d))  # F (D, D)
        self.register_buffer("corr_updates", torch.zeros((), dtype=torch.long))  # F updates so far
        self.pending_corr: torch.Tensor | None = None  # this step's E_B[f f^T], applied in on_step_end

    @property
    def backbone(self) -> nn.Module:
        return self.online[0]

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        z1, z2 = self.online(x1), self.online(x2)  # (N, D): f, the predictor's input
        p1 = F.linear(z1, self.predictor_weight)  # (N, D) = W_p z; no gradient reaches W_p (a buffer)
        p2 = F.linear(z2, self.predictor_weight)
        with torch.no_grad():
            z1_t, z2_t = self.target(x1), self.target(x2)  # (N, D), no gradient
        loss = directpred_loss(p1, p2, z1_t, z2_t)
        self.pending_corr = batch_correlation(torch.cat([z1, z2]))  # (D, D), both views, global batch
        return {"loss": loss, "tau": torch.tensor(self.cfg.tau)}

    def param_groups(self) -> list[dict]:
        """Every trainable parameter (backbone and projector; W_p is a buffer) with the weight decay, as the
        official optimizer applies it; at a constant rate unless ``constant_lr`` is off."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.cfg.weight_decay, "fixed_lr": self.cfg.constant_lr}]

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step (``step`` counts finished steps): F takes this step's batch statistic,
        W_p is set from F every ``freq`` steps starting with the first, and the target follows."""
        cfg = self.cfg
        if self.pending_corr is not None:
            if self.corr_updates == 0:
                self.corr.copy_(self.pending_corr)  # the first estimate is the batch's (official Accumulator)
            else:
                self.corr.mul_(cfg.rho).add_(self.pending_corr, alpha=1 - cfg.rho)  # Eq. 18-19
            self.corr_updates += 1
            self.pending_corr = None
        if (step - 1) % cfg.freq == 0 and self.corr_updates > 0:
            self.predictor_weight.copy_(predictor_from_correlation(self.corr, cfg.eps))
        ema_update(self.target, self.online, cfg.tau)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The online encoder's features, before the projector (the official linear evaluation uses them)."""
        return self.backbone(x)


MODEL = DirectPred


if __name__ == "__main__":
    f = torch.randn(64, 16) @ torch.randn(16, 16)
    w = predictor_from_correlation(batch_correlation(f), eps=0.01)
    print("eigenvalues of W_p:", torch.linalg.eigvalsh(w).tolist())
