"""AMDIM — Bachman, Hjelm, Buchwalter. "Learning Representations by Maximizing Mutual Information Across
Views". NeurIPS 2019, arXiv:1906.00910. Catalog id: ``amdim``. Official code: Philip-Bachman/amdim-public.

Augmented Multiscale Deep InfoMax: local DIM across two augmented views x^a, x^b of each image, at several
scales of the encoder. The encoder gives, per view, a global feature r_1 (1 x 1) and local feature maps
r_5, r_7 (5 x 5 and 7 x 7 at 128 px); every local feature is embedded into the global feature's space
(d dims) by a 1x1-conv residual head. A source feature s of one view is scored against every target
feature t at location l of the other view with a scaled dot product, soft-clipped and penalised:

    phi_ijl       = c tanh( (s_i . t_jl / sqrt(d)) / c ),                          c = 20,
    L_nce(s -> t) = -1/(N L) sum_{i, l} log  e^phi_iil / ( e^phi_iil + sum_{j != i, l'} e^phi_ijl' ),
    L_reg(s -> t) = lambd mean_{i, j, l} (s_i . t_jl / sqrt(d))^2,                 lambd = 0.05,

i.e. NCE with the other images' features at every location of the batch as negatives (the sum over j != i
is shared by the L positives of image i). Three predictions, each in both directions and averaged over
them: 1-to-5 (r_1 of one view predicts r_5 of the other), 1-to-7, and 5-to-5 (one random location of r_5
predicts r_5 of the other view):

    L = sum_{(s, t) in {1t5, 1t7, 5t5}} 1/2 [ L_nce(s^a -> t^b) + L_nce(s^b -> t^a)
                                            + L_reg(s^a -> t^b) + L_reg(s^b -> t^a) ].

The regularisation (the soft clip of the scores and the penalty on the squared raw scores, applied before
the clip) is the paper's stabilisation of the NCE objective; its forms and constants are those of the
official ``costs.py`` (``tanh_clip``, ``lgt_reg = 5e-2 * (raw_scores**2).mean()``) and ``--tclip 20``.

Scales, from a backbone that returns pooled vectors: r_1 is the backbone's output (N, D), d = D; r_5 is the
backbone's final feature map (the last map of more than 1 x 1, the one the global pooling reads), r_7 the
map entering its last spatial reduction (the layer before, at twice the resolution), both read with forward
hooks during the same forward and embedded into d dims. small_cnn at 32 px: r_5 is its 4 x 4 x 256 map, r_7
its 8 x 8 x 128 map; torchvision ResNets: layer4 and layer3. All three of the paper's predictions are kept
(1t5, 1t7, 5t5), with "5" and "7" meaning these two maps. The layers are found once, from the module tree,
with their channel counts (no dummy forward).

Collapse: the negatives are the other images of the batch (at every location): features that do not
depend on the image score a target of another image as high as their own, and each NCE term is then at
least log(1 + (N - 1) L), its value without information (equality when every score is the same); only
features that single out their own image's other view lower it.

Distributed: negatives come from the global batch. The target embeddings (r_5, r_7 of both views) are
all-gathered with gradient across ranks, each rank scores its own sources against every gathered target,
and the mean over ranks of the per-rank means (NCE and penalty) is the loss of one process on the
concatenated batch; DDP's gradient averaging does the rest. The random draws of forward (the shared flip,
the 5-to-5 source locations) are made for the global batch on every rank, each rank keeping its rows: with
the same seed on every rank they equal one process's draws row for row (the harness seeds ranks apart, so
they are independent there).

Deviations:
- the backbone is the harness's (small_cnn, ResNets), not the paper's ResNet with valid convolutions whose
  7 x 7 and 5 x 5 maps and 1 x 1 output come from its last blocks; "5" and "7" are the backbone's two last
  resolutions, and r_1 is its pooled output, used as it is (the official encoder ends in a BN layer);
- the horizontal flip, shared by both views of an image in the official ``datasets.py``, is applied in
  ``forward`` to both views alike (the views' pipelines have independent randomness); a flip commutes with
  the colour ops and mirrors the crop box, whose distribution is symmetric, so the views are distributed as
  in the official code;
- Adam with L2 decay 1e-5 is AdamW with decoupled decay 1e-5 here (the harness's optimizers), biases and
  norms exempt; the step schedule (lr x 0.2 at fixed epochs) is the harness's warm-up + cosine;
- the online evaluation classifiers the official code trains beside the encoder (on detached features) are
  left to the harness's evaluation;
- the Gaussian blur is not part of the recipe (the official code has none).
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
    tclip: float = 20.0
    """c of the soft clip c tanh(s / c) of the scores (official ``--tclip 20``, README, ``NCE_MI_MULTI``)."""
    score_reg: float = 0.05
    """lambd of the penalty on the squared raw scores (official ``costs.py``: ``5e-2 * (raw_scores**2).mean()``)."""
    shared_flip: bool = True
    """One horizontal flip for both views of an image (official ``datasets.py``: ``flip_lr`` before the two
    view transforms)."""
    min_scale: float = 0.3
    """Smallest area fraction of the random resized crop (official ``TransformsImageNet128``, STL-10 too)."""
    crop_ratio: tuple[float, float] = (0.7, 1.4)
    """Aspect-ratio range of the crop (official ``TransformsImageNet128``)."""
    hue: float = 0.1
    """Hue jitter; brightness, contrast, saturation 0.4, all with p = 0.8 (official ImageNet transform; its
    CIFAR-10 and STL-10 transforms use hue 0.2)."""
    grayscale_p: float = 0.25
    """Probability of random grayscale (official transforms)."""
    optimizer: str = "adamw"
    """Adam (official ``task_self_supervised.py``); AdamW here, see Deviations."""
    base_lr: float = 2.56e-4
    """lr 2e-4 at the default batch 200 (official ``train.py``), i.e. 2.56e-4 per 256 images."""
    betas: tuple[float, float] = (0.8, 0.999)
    """Adam betas (official ``task_self_supervised.py``)."""
    weight_decay: float = 1e-5
    """Official ``task_self_supervised.py``."""
    warmup_epochs: float = 0.08
    """A linear warm-up over the first 500 updates (official ``_train``): 0.08 ImageNet epochs at batch 200."""
    epochs: int = 50
    """ImageNet schedule of the official code (``task_self_supervised.py``; its comment notes that the best
    results used longer ones, e.g. 100 epochs); CIFAR-10 and STL-10: 300."""
    batch_size: int = 200
    """Official ``train.py`` default (its README's ImageNet command uses 480 on 4 GPUs)."""
    sync_batchnorm: bool = False
    """The official code trains with DataParallel: BN statistics per GPU."""


# Small-scale preset for CPU runs on the embedded digits (1,437 images, 32 px, small_cnn, 330 steps at batch
# 64; k-NN of `selfsup train amdim --set ...`, random init 0.839):
# - base_lr 4e-3 (lr 1e-3 at batch 64): the official 2e-4 is for hundreds of thousands of steps; in 330 steps
#   base_lr 1e-3 gives 0.933, 4e-3 gives 0.964;
# - min_scale 0.4: 30% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other methods' presets).
PRESETS = {"small": dict(base_lr=4e-3, min_scale=0.4)}


# --- augmentations (official datasets.py) ------------------------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views of one distribution: random resized crop, colour jitter (p=0.8), grayscale (p=0.25), as
    the official ImageNet transform; the shared flip is applied in ``forward`` (``shared_flip``), or here per
    view without it. Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""
    steps = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), ratio=cfg.crop_ratio, antialias=True)]
    if not cfg.shared_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, cfg.hue)], p=0.8),
        v2.RandomGrayscale(p=cfg.grayscale_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- the feature maps inside the backbone ---------------------------------------------------------------


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


# --- heads --------------------------------------------------------------------------------------------


class LocalEmbedding(nn.Module):
    """A local feature map (N, C, H, W) -> (N, d, H, W) in the global feature's space: a 1x1-conv residual
    MLP whose second conv starts at zero, a shortcut that starts as a noisy identity, and BN on the output
    (official ``FakeRKHSConvNet``, hidden BN off as with its default ``--use_bn 0``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 1, bias=False)
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1)
        self.bn_out = nn.BatchNorm2d(out_dim)
        with torch.no_grad():
            self.conv2.weight.zero_()  # the residual branch starts silent (official init_weights)
            if out_dim >= in_dim:
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight[:, :, 0, 0].diagonal().fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_out(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


# --- loss ---------------------------------------------------------------------------------------------


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


def tanh_clip(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Soft clip to (-clip, clip): clip tanh(x / clip) (official ``tanh_clip``)."""
    return clip * torch.tanh(x / clip)


def nce_loss(src: torch.Tensor, trg: torch.Tensor, offset: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_nce, mean squared raw score) of predicting trg from src. src: (N, d) sources of this rank's images;
    trg: (K, d, L) targets of K images at L locations, image i's own at row i + offset."""
    n, d = src.shape
    k, _, locs = trg.shape
    raw = torch.einsum("nd,kdl->nkl", src, trg) / d**0.5  # (N, K, L)
    reg = raw.pow(2).mean()  # penalised before the clip
    scores = tanh_clip(raw, clip)
    own = F.one_hot(torch.arange(n, device=src.device) + offset, k).bool()  # (N, K)
    pos = scores[own].view(n, locs)  # (N, L)
    neg = scores[~own].view(n, (k - 1) * locs)  # other images, every location
    lse_neg = torch.logsumexp(neg, dim=1, keepdim=True)  # (N, 1), shared by the L positives of image i
    return (torch.logaddexp(pos, lse_neg) - pos).mean(), reg  # -log e^pos / (e^pos + sum e^neg)


def amdim_loss(r1: tuple, r5: tuple, r7: tuple, src5: tuple, offset: int, clip: float, lambd: float) -> tuple[torch.Tensor, dict]:
    """The multiscale loss over 1t5, 1t7 and 5t5, both directions. r1, src5: (a, b) sources (N, d) of each
    view; r5, r7: (a, b) gathered targets (K, d, L) of each view. Returns (loss, the three NCE terms)."""
    terms, total = {}, 0.0
    for name, src, trg in (("1t5", r1, r5), ("1t7", r1, r7), ("5t5", src5, r5)):
        nce_ab, reg_ab = nce_loss(src[0], trg[1], offset, clip)  # view a predicts view b
        nce_ba, reg_ba = nce_loss(src[1], trg[0], offset, clip)
        terms[name] = 0.5 * (nce_ab + nce_ba)
        total = total + terms[name] + lambd * 0.5 * (reg_ab + reg_ba)
    return total, terms


# --- model --------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def draw_for_batch(n_local: int, high: int, device: torch.device) -> torch.Tensor:
    """(n_local,) integers uniform in [0, high): this rank's rows of one draw for the global batch."""
    world, rank = _world()
    return torch.randint(high, (world * n_local,), device=device)[rank * n_local : (rank + 1) * n_local]


class AMDIM(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.reduction, channels_7, self.channels_5 = find_feature_maps(backbone)
        self.embed_5 = LocalEmbedding(self.channels_5, feature_dim)  # r_5 in r_1's space (d = D)
        self.embed_7 = LocalEmbedding(channels_7, feature_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r_1 (N, d), r_5 (N, d, L5), r_7 (N, d, L7) of one view."""
        y, map_7, map_5 = forward_with_maps(self.backbone, x, self.reduction, final=True)
        if map_5 is None or map_5.shape[1] != self.channels_5:
            got = "none" if map_5 is None else f"{map_5.shape[1]} channels"
            raise RuntimeError(f"AMDIM: the backbone's final feature map ({got}) should have {self.channels_5} channels "
                               "and be larger than 1 x 1 at this image size")
        return y, self.embed_5(map_5).flatten(2), self.embed_7(map_7).flatten(2)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x_a, x_b = batch["views"][:2]  # (N, C, H, W) each
        n = x_a.shape[0]
        if cfg.shared_flip:  # one flip for both views of an image
            flip = draw_for_batch(n, 2, x_a.device).bool()[:, None, None, None]
            x_a, x_b = torch.where(flip, x_a.flip(-1), x_a), torch.where(flip, x_b.flip(-1), x_b)
        (r1_a, r5_a, r7_a), (r1_b, r5_b, r7_b) = self.encode(x_a), self.encode(x_b)
        with torch.autocast(x_a.device.type, enabled=False):  # scores and the loss in float32
            r1_a, r5_a, r7_a, r1_b, r5_b, r7_b = (t.float() for t in (r1_a, r5_a, r7_a, r1_b, r5_b, r7_b))
            rows = torch.arange(n, device=x_a.device)
            # 5-to-5: one random location of each image's r_5 is the source (official _sample_src_ftr)
            src5_a = r5_a[rows, :, draw_for_batch(n, r5_a.shape[2], x_a.device)]  # (N, d)
            src5_b = r5_b[rows, :, draw_for_batch(n, r5_b.shape[2], x_a.device)]
            (t5_a, offset), (t5_b, _) = gather_with_grad(r5_a), gather_with_grad(r5_b)  # (N_global, d, L5)
            (t7_a, _), (t7_b, _) = gather_with_grad(r7_a), gather_with_grad(r7_b)  # (N_global, d, L7)
            loss, terms = amdim_loss((r1_a, r1_b), (t5_a, t5_b), (t7_a, t7_b), (src5_a, src5_b), offset,
                                     cfg.tclip, cfg.score_reg)
        return {"loss": loss, **{f"nce_{k}": v.detach() for k, v in terms.items()}}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """r_1, the backbone's pooled features: the global features the paper's linear and MLP evaluation
        classifiers read (official ``Evaluator`` on ``rkhs_1``)."""
        return self.backbone(x)


MODEL = AMDIM


if __name__ == "__main__":
    src, trg = torch.randn(8, 32), torch.randn(8, 32, 25)
    print("random:", nce_loss(src, trg, 0, 20.0)[0].item(),
          "matched:", nce_loss(src, 10 * src[:, :, None].expand(-1, -1, 25), 0, 20.0)[0].item())
