"""DIM (Deep InfoMax) — Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler, Bengio. "Learning
Deep Representations by Mutual Information Estimation and Maximization". ICLR 2019, arXiv:1808.06670.
Catalog id: ``dim``. Official code: rdevon/DIM.

The encoder E maps an image x to an M x M feature map C(x) (an intermediate layer, M^2 local features
C^(l)(x), each seeing a patch of the image) and on to a global vector Y = E(x). A discriminator T scores
pairs: a pair drawn from the joint (a feature of x with Y of the same x) against pairs from the product of
marginals (a feature of another image x' of the batch with Y of x). With sp(z) = log(1 + e^z), the two
estimators of Sec. 3.1 are

    I_JSD(X; Y)     = E_P[-sp(-T(x, y))] - E_{P x P~}[sp(T(x', y))]                     (Eq. 4)
    I_infoNCE(X; Y) = E_P[T(x, y) - log sum_{x' in {x} u negatives} e^{T(x', y)}]        (Eq. 5)

The local objective averages the estimate over the M^2 locations (Eq. 6), the global one uses the whole
map; the training loss is their weighted negative (Eq. 8 without the prior term):

    L = -alpha I(C(X); Y) - beta / M^2 sum_l I(C^(l)(X); Y).

``alpha = 0, beta = 1`` is the paper's local-only DIM(L), its best representation for classification
(Table 1); ``alpha = 1, beta = 0`` the global-only DIM(G). For InfoNCE the negatives of a local feature
(i, l) are every location of every other image of the batch (the official code's ``infonce_loss``); for JSD
every pair (Y_i, C^(l)(x_j)), j != i, at every location is a sample of P x P~ (its ``fenchel_dual_loss``).

Discriminator: encode-and-dot-product (the paper's appendix draws it beside concat-and-convolve),
T(C^(l)(x), y) = phi(y) . psi(C^(l)(x)), with phi, psi 1x1-conv residual MLPs ending in LayerNorm (the
official ``MI1x1ConvNet``). It is the official code's current scorer, and it scores all N x N x M^2 pairs of
a batch with one matrix product, where concat-and-convolve would run a network on every pair. For the
global objective psi sees the average of the map (see Deviations).

The feature map, from any convolutional backbone that returns pooled vectors: C(x) is the map entering the
backbone's LAST spatial reduction (a max/avg pool, an adaptive pool to more than 1x1, or a strided conv),
read with a forward pre-hook during the forward that also gives Y. The layer is found once, from the module
tree, with its channel count (a strided conv's in_channels, or for a pool the width of the last conv/BN
before it), so no dummy forward is needed. small_cnn at 32 px: the 8 x 8 x 128 map of its third block (as
the official 32-px encoder's local map, ``basic32x32``: 8 x 8 x 128 after two strided convs), Y its 256-d
pooled output after one more block; torchvision ResNets: layer3's output. A backbone without such a layer (a ViT) is rejected.

Collapse: features that do not depend on the image (or do not tell images apart) give matched and
mismatched pairs the same scores, so the discriminator cannot beat chance: the JSD loss is then at least
2 log 2 and the InfoNCE loss at least log(1 + (N - 1) M^2), their values without information (equality
when every score is the same). Only features that identify their own image among the other images of the
batch lower it.

Distributed: negatives come from the global batch. The local (and global) embeddings psi(C) are
all-gathered with gradient across ranks, each rank scores its own Y against every gathered feature, and the
mean over ranks of the per-rank means is the loss of one process on the concatenated batch (every rank holds
as many positives and negatives); DDP's gradient averaging does the rest.

Deviations:
- no prior-matching term (Sec. 3.3, gamma): it is an adversarial game with its own discriminator and its own
  optimizer step, which the harness's one-loss, one-optimizer loop does not express; it shapes the
  distribution of Y, and the official README's basic CIFAR-10 command trains without it (the prior is an
  option there, ``prior --prior.scale 0.1``);
- Y is the backbone's pooled output, not the 64-d linear layer after a 1024-d fc layer of the official
  32-px encoder (``basic32x32``, ``output_units=64``): the harness's backbones end in global pooling;
- the global discriminator averages C(x) over locations before psi; the official ``GlobalDIM`` runs a fresh
  copy of the encoder's remaining layers on it, which a generic backbone does not offer, and a flattening
  layer would fix the map size, while the harness's backbones see several image sizes;
- InfoNCE excludes an image's own locations from its negatives exactly; the official code sets their scores
  to -10, which leaves M^2 e^-10 in each denominator;
- the JSD loss is -Eq. 4 as written; the official code shifts both expectations by log 2 (a constant
  2 log 2 in the loss, the same gradient);
- Adam is AdamW here (the harness's optimizers), with no weight decay, so the two coincide;
- no Donsker-Varadhan estimator (Eq. 2), the paper's third: JSD (the official default) and InfoNCE (the
  paper's best for classification) are the two offered.
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
    estimator: str = "infonce"
    """``"infonce"`` (Eq. 5) or ``"jsd"`` (Eq. 4). The paper trains DIM(L) with each (Table 1), InfoNCE
    giving the best classification results; the official code defaults to JSD (``LocalDIM.routine``:
    ``mode='fd'``, ``measure='JSD'``)."""
    alpha: float = 0.0
    """Weight of the global MI, I(C(X); Y) (Eq. 8); 0 in DIM(L), 1 in DIM(G)."""
    beta: float = 1.0
    """Weight of the local MI averaged over locations (Eq. 6, 8); 1 in DIM(L), 0 in DIM(G)."""
    mi_units: int = 2048
    """Width of the discriminator's embeddings phi(Y), psi(C) (official ``LocalDIM.build``, ``mi_units``;
    its README uses 1024 for the NCE runs compared with CPC)."""
    min_scale: float = 1.0
    """Smallest area fraction of the random resized crop; 1.0: the whole image, no augmentation, as the
    paper trains on CIFAR-10/100 (Sec. 4; it crops and flips only STL-10)."""
    flip: bool = False
    """Random horizontal flip (Sec. 4: STL-10 only)."""
    optimizer: str = "adamw"
    """Adam (official model defaults, ``optimizer=dict(learning_rate=1e-4)``); AdamW without weight decay
    here, the same update."""
    base_lr: float = 4e-4
    """lr 1e-4 at batch 64 (official model defaults), i.e. 4e-4 per 256 images."""
    weight_decay: float = 0.0
    """Not stated in the paper; the official scripts set none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Not stated in the paper or the official scripts; PyTorch's Adam defaults."""
    warmup_epochs: int = 0
    """No warm-up in the official code."""
    epochs: int = 1000
    """Official model defaults (``train=dict(epochs=1000)``) and README command (``--t.epochs 1000``)."""
    batch_size: int = 64
    """Official model defaults (``batch_size=dict(train=64)``)."""
    sync_batchnorm: bool = False
    """The official code trains on one GPU (DataParallel otherwise): BN statistics per device."""


# Small-scale preset for CPU runs on the embedded digits (1,437 images, 32 px, small_cnn, 330 steps at batch
# 64; k-NN of `selfsup train dim --set ...`, random init 0.839):
# - mi_units 256: 2048-d 1x1 convolutions over 64 x 8 x 8 locations cost ~17 GFLOP a step on the CPU;
# - estimator "jsd" (the official default): InfoNCE ends below random init in 330 steps (0.811 at base_lr
#   4e-4 and at 4e-3; 0.797 with crops, min_scale 0.4), JSD at 4e-3 gives 0.869. With LayerNorm'd 256-d
#   embeddings the initial scores have a std of ~16, and InfoNCE spends most of the budget bringing its loss
#   down to the no-information value (49 -> 8.3, log(1 + 63 x 64) = 8.3);
# - base_lr 4e-3 (lr 1e-3 at batch 64): the paper's 1e-4 is for 1000 epochs;
# - no crops (the paper's CIFAR setting): crops did not help InfoNCE here (0.811 -> 0.797).
PRESETS = {"small": dict(mi_units=256, estimator="jsd", base_lr=4e-3)}


# --- augmentations (Sec. 4) ------------------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: the whole image (CIFAR, Sec. 4), or a random crop and flip (STL-10). Each view is one v2
    pipeline; it takes a PIL image or a uint8 tensor."""
    steps = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True)]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps)]


# --- the feature map inside the backbone ----------------------------------------------------------------


def _reduces(m: nn.Module) -> bool:
    """A layer that lowers the resolution of a feature map, global pooling (to 1 x 1) excluded."""
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Conv2d)):
        stride = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
        return tuple(stride) != (1, 1)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        return tuple(size) != (1, 1)
    return False


def find_feature_maps(backbone: nn.Module) -> tuple[str, int, int]:
    """(the name of the backbone's last spatial reduction of a feature map, the channels of the map it
    receives, the channels of the backbone's final map), from the module tree in registration order: a
    strided conv's in_channels, or for a pool the width of the last conv or BN before it."""
    width, found = None, None
    for name, m in backbone.named_modules():
        if next(m.children(), None) is not None:
            continue  # leaves only
        if _reduces(m):
            incoming = m.in_channels if isinstance(m, nn.Conv2d) else width
            if width is not None:  # a reduction before any conv works on the image itself
                found = (name, incoming)
        if isinstance(m, nn.Conv2d):
            width = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            width = m.num_features
    if found is None:
        raise ValueError(f"{type(backbone).__name__}: no feature map found (no pooling or strided convolution after a "
                         "convolution); a convolutional backbone is needed")
    return found[0], found[1], width


def forward_with_maps(backbone: nn.Module, x: torch.Tensor, reduction: str,
                      final: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward of the backbone: (its output (N, D), the map entering its submodule ``reduction``
    (N, C, H, W), and with ``final`` the last map of more than 1 x 1 that any layer outputs, else None).
    The hooks live only for this call."""
    maps: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        maps["local"] = args[0]

    def keep_output(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
            maps["final"] = out

    handles = [backbone.get_submodule(reduction).register_forward_pre_hook(keep_input)]
    if final:
        handles += [m.register_forward_hook(keep_output) for m in backbone.modules() if next(m.children(), None) is None]
    try:
        y = backbone(x)
    finally:
        for h in handles:
            h.remove()
    return y, maps["local"], maps.get("final")


# --- heads: the encode-and-dot-product discriminator ------------------------------------------------------


class MIHead(nn.Module):
    """1x1-conv residual MLP with LayerNorm on the output (official ``MI1x1ConvNet``): (N, C, H, W) ->
    (N, U, H, W); vectors go in as 1 x 1 maps."""

    def __init__(self, in_dim: int, units: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_dim, units, 1, bias=False), nn.BatchNorm2d(units), nn.ReLU(inplace=True),
            nn.Conv2d(units, units, 1),
        )
        self.shortcut = nn.Conv2d(in_dim, units, 1, bias=False)
        self.norm = nn.LayerNorm(units)
        if units >= in_dim:  # the shortcut starts as a noisy identity (official code)
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight[:, :, 0, 0].diagonal().fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x) + self.shortcut(x)  # (N, U, H, W)
        return self.norm(h.movedim(1, -1)).movedim(-1, 1)  # LayerNorm over the U channels


# --- losses -------------------------------------------------------------------------------------------


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


def dim_scores(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """T for every pair: y (N, U) embedded globals, c (K, U, L) embedded features of K images at L
    locations -> (N, K, L), scores[i, j, l] = T(C^(l)(x_j), Y_i)."""
    return torch.einsum("nu,kul->nkl", y, c)


def _split(scores: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives (N, L), negatives (N, K - 1, L)); the positive of row i is column i + offset."""
    n, k, locs = scores.shape
    pos_col = torch.arange(n, device=scores.device) + offset
    is_pos = F.one_hot(pos_col, k).bool()  # (N, K)
    return scores[is_pos].view(n, locs), scores[~is_pos].view(n, k - 1, locs)


def jsd_loss(scores: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """-I_JSD (Eq. 4), averaged over locations (Eq. 6). scores: (N, K, L) from :func:`dim_scores`; the
    positive of row i is column i + offset, every other column at every location is a sample of P x P~."""
    pos, neg = _split(scores, offset)
    e_joint = -F.softplus(-pos).mean()  # E_P[-sp(-T(x, y))]
    e_marginals = F.softplus(neg).mean()  # E_{P x P~}[sp(T(x', y))]
    return -(e_joint - e_marginals)  # Eq. 4


def infonce_loss(scores: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """-I_infoNCE (Eq. 5), averaged over locations (Eq. 6). scores: (N, K, L) from :func:`dim_scores`; each
    positive (i, l) is contrasted with every location of every other image (K - 1) L negatives."""
    pos, neg = _split(scores, offset)
    lse_neg = torch.logsumexp(neg.flatten(1), dim=1, keepdim=True)  # (N, 1): shared by the L positives
    return (torch.logaddexp(pos, lse_neg) - pos).mean()  # -log e^pos / (e^pos + sum e^neg)


ESTIMATORS = {"jsd": jsd_loss, "infonce": infonce_loss}


# --- model --------------------------------------------------------------------------------------------


class DIM(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {cfg.estimator!r}")
        if cfg.alpha <= 0 and cfg.beta <= 0:
            raise ValueError("DIM: alpha (global MI) or beta (local MI) must be positive")
        self.cfg = cfg
        self.backbone = backbone
        self.reduction, self.map_channels, _ = find_feature_maps(backbone)
        # heads only for the objectives in use: DDP expects every parameter to get a gradient
        if cfg.beta > 0:
            self.local_y = MIHead(feature_dim, cfg.mi_units)  # phi for the local objective
            self.local_c = MIHead(self.map_channels, cfg.mi_units)  # psi, on every location
        if cfg.alpha > 0:
            self.global_y = MIHead(feature_dim, cfg.mi_units)
            self.global_c = MIHead(self.map_channels, cfg.mi_units)  # on the map's average

    def mi_loss(self, phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """-I over this rank's globals phi (N, U) and the global batch's features psi (N, U, L), in float32."""
        with torch.autocast(phi.device.type, enabled=False):
            psi_all, offset = gather_with_grad(psi.float())  # (N_global, U, L): negatives from every rank
            return ESTIMATORS[self.cfg.estimator](dim_scores(phi.float(), psi_all), offset)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x = batch["views"][0]  # (N, C, H, W)
        y, c, _ = forward_with_maps(self.backbone, x, self.reduction)  # (N, D), (N, C_map, M, M)
        if c.shape[1] != self.map_channels:
            raise RuntimeError(f"DIM: the feature map has {c.shape[1]} channels, {self.map_channels} expected")
        y4 = y[:, :, None, None]  # (N, D, 1, 1)
        out, loss = {}, 0.0
        if cfg.beta > 0:
            local = self.mi_loss(self.local_y(y4).flatten(1), self.local_c(c).flatten(2))  # Eq. 6: mean over the M^2
            loss = loss + cfg.beta * local
            out["local_mi"] = -local.detach()
        if cfg.alpha > 0:
            pooled = c.mean(dim=(2, 3), keepdim=True)  # (N, C_map, 1, 1)
            glob = self.mi_loss(self.global_y(y4).flatten(1), self.global_c(pooled).flatten(2))  # L = 1
            loss = loss + cfg.alpha * glob
            out["global_mi"] = -glob.detach()
        return {"loss": loss, **out}  # Eq. 8, as a loss

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Y = E(x), the backbone's pooled features: the global vector the objective trains (the paper also
        evaluates its encoder's last conv layer and fc layer, Table 1)."""
        return self.backbone(x)


MODEL = DIM


if __name__ == "__main__":
    g, c = torch.randn(8, 16), torch.randn(8, 16, 25)  # (N, U) globals, (N, U, L) local features
    matched = 3 * g[:, :, None].expand(-1, -1, 25)  # every location of image i aligned with Y_i
    for name, loss in ESTIMATORS.items():
        print(name, "random:", loss(dim_scores(g, c)).item(), "matched:", loss(dim_scores(g, matched)).item())
