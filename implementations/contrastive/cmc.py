"""CMC — Tian, Krishnan, Isola. "Contrastive Multiview Coding". ECCV 2020, arXiv:1906.05849.
Catalog id: ``cmc``. Official code: HobbitLong/CMC (train_CMC.py, NCE/NCEAverage.py, NCE/NCECriterion.py).

Two views of one image, its L channel (V1) and its ab channels (V2) in Lab colour, each with its own
encoder: z_1 = f_1(v_1), z_2 = f_2(v_2), L2-normalised 128-d embeddings. The critic of a pair is
h({v_1, v_2}) = exp(z_1 . z_2 / tau), and with one positive pair (the two views of image i) among k + 1
(the other k pairs take v_2 from other images), the contrastive loss anchored on V1 is (Sec. 3)

    L^{V1,V2} = -log  h({v_1^i, v_2^i}) / sum_{j=1..k+1} h({v_1^i, v_2^j}),

and the two-view objective contrasts in both directions, L(V1, V2) = L^{V1,V2} + L^{V2,V1}.

``loss`` chooses how the k negatives are found and the softmax is computed:
- ``"nce"`` (the default of the official code): as InstDisc, a memory bank per view holds one unit vector
  per training image, M_1 (L features) and M_2 (ab features). For the L anchor z_1,i the positive is
  M_2[i] and K noise entries M_2[j_1..j_K] are drawn uniformly (P_n = 1/n); with P(j | z) =
  exp(M[j] . z / tau) / Z and h = P / (P + K P_n), J = -log h(i) - sum_k log(1 - h(j_k)) (official
  NCECriterion); the ab anchor z_2,i is scored alike against M_1. Z is estimated once, from the first
  batch, as n times the mean of exp(score / tau) over its K + 1 columns (official NCEAverage), one Z per
  direction, then fixed;
- ``"softmax"``: the same bank scores in a (K + 1)-way softmax, cross-entropy with the positive in column 0
  (official ``--softmax``, which the README reports better than NCE);
- ``"batch"``: no bank: the k negatives of L^{V1,V2} are the ab embeddings of the other images of the
  (global) batch, and the other way round; a softmax over the batch (not run in the paper, whose
  negatives come from the bank; offered for comparison with the in-batch methods).
After the loss, without gradient, both banks are updated at the batch's indices with the features of
their own view: M[i] <- normalise(m M[i] + (1 - m) z_i), m = 0.5 (official ``--nce_m``).

Views: one crop per image (random resized crop and flip, no colour jitter: the official training
transform), normalised RGB as the harness gives it. ``forward`` and ``embed`` undo the data set's
normalisation (``set_normalization``; ImageNet's mean and std until it is called, so a copied file
works), convert sRGB (D65) to CIE Lab in torch with the formulas of skimage's ``rgb2lab`` that the
official code calls, and normalise L and ab by the official constants (L: (L - 50) / 50; a and b by the
centre and half-width of their ranges). The L encoder is the harness's backbone with its first
``nn.Conv2d`` (found generically, the first in ``named_modules`` order) replaced by a fresh one with 1 input
channel; the ab encoder is a deep copy of the backbone, taken before, with its first conv made for 2
channels. Each encoder ends in a linear 128-d head (the official ResNets' fc + L2 normalisation).
``embed`` concatenates both encoders' pooled features, [f_1(L), f_2(ab)], as the paper's linear evaluation
does. CMC needs colour images: on grayscale ones a and b are zero up to the rounding of the conversion
constants (the matrix rows sum to 0.950456 and 1.088754 against the white point's 0.95047 and 1.08883),
which leaves a ~ -2e-5 (L + 16) and b ~ 4e-5 (L + 16), a copy of L scaled by 1e-5 that the ab encoder's
BN rescales: on the embedded digits (grayscale) CMC contrasts two encoders of the same crop of L.

Collapse: the negatives. Features that do not tell images apart give every candidate the same score: the
softmax then has loss log(K + 1) per direction (log N_global in-batch), NCE with Z estimated there
log(K + 1) + K log(1 + 1 / K); only spreading the images over the sphere lowers it. The bank entries of
the other view are constants of the loss (stop-gradient), as in InstDisc.

Distributed: the banks and the two Z must be identical on every rank. The banks are updated with the
features and indices of the GLOBAL batch (all-gathered without gradient, then written alike on every
rank); Z is estimated from the scores of the global batch (an all-reduce). A bank loss of one sample
needs only its own features, its noise entries and the banks, so the mean over ranks of the per-rank mean
is the loss of the global batch. Noise indices: each rank draws an (N_global, K) block from its step RNG
and keeps its rows (the same negatives for both directions, as the official code). The in-batch loss
gathers the embeddings with gradient (``gather_with_grad``, as SimCLR).

Deviations:
- learning rate: the harness decays it with a cosine; the official code divides it by 10 at epochs 120,
  160 and 200;
- banks: initialised uniform in [-sqrt(3/D), sqrt(3/D)] as the official code, then normalised so that the
  entries are unit vectors from the start (the official code leaves them unnormalised until written);
- the encoders are the harness's backbone, not the paper's half-width AlexNet or ResNet-50 pair: the second
  is a deep copy, so both start from the same weights apart from their first convolution (the official code
  builds the two independently);
- the Lab conversion clamps the de-normalised RGB to [0, 1] (a real image's range) before converting;
- evaluation uses the concatenated backbone features (``embed``), for the harness's k-NN and linear probe;
- biases and BN parameters get no weight decay (the harness's optimizer groups); the official code decays all.

Cost: each sample gathers its K noise entries from both banks, two (N, K + 1, D) tensors as in the official
code (2 GB at N = 128, K = 16,384, D = 128 in float32); two encoders double the backbone's cost.
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
    proj_dim: int = 128
    """Dimension of each view's normalised embedding and of the bank entries (official ``--feat_dim``)."""
    loss: str = "nce"
    """``"nce"``: NCE against K bank entries (official default); ``"softmax"``: (K + 1)-way softmax against
    the bank (official ``--softmax``); ``"batch"``: in-batch softmax, no bank (see the docstring)."""
    nce_k: int = 16384
    """K, negatives per anchor drawn from the bank (official train_CMC.py ``--nce_k`` default; the README's
    flag list says 4096, with which its released weights were trained)."""
    temperature: float = 0.07
    """tau (official ``--nce_t``; the README: 0.07 for ImageNet, 0.1 for STL-10)."""
    bank_momentum: float = 0.5
    """m in M[i] <- normalise(m M[i] + (1 - m) z_i) (official ``--nce_m``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official train_CMC.py: 0.08 for ResNets on
    ImageNet, ``--crop_low`` 0.2 for AlexNet)."""
    optimizer: str = "sgd"
    """SGD with momentum (official train_CMC.py)."""
    base_lr: float = 0.06
    """The official lr 0.03 at batch 128 (``--learning_rate``; the README's ResNet command), i.e. 0.06 per
    256 images under the harness's linear scaling."""
    weight_decay: float = 1e-4
    """Official ``--weight_decay``."""
    momentum: float = 0.9
    """Official ``--momentum``."""
    warmup_epochs: int = 0
    """No warm-up (official code)."""
    epochs: int = 240
    """Official ``--epochs`` (lr / 10 at 120, 160, 200; the harness uses a cosine instead)."""
    batch_size: int = 128
    """The README's ResNet command (4 GPUs; its AlexNet command uses 256 on one GPU)."""
    sync_batchnorm: bool = False
    """The official code trains with DataParallel: BN statistics per GPU."""


# Small-scale preset for short CPU runs (the embedded digits: 330 steps at batch 64; CIFAR-10: one epoch at
# batch 128, as the knn-cifar10-short benchmark; figures from `selfsup train cmc --data
# cifar10-jpeg.tar.gz --epochs 1 --batch-size 128 --preset small --set ...`, random init of
# the same two encoders: k-NN 40.0%, linear 56.5%):
# - loss "batch": a bank entry is written once per epoch, so in a one-epoch run every positive M[i] is still
#   its random initial vector when it is scored and the bank losses learn no correspondence between L and
#   ab (a bank needs many epochs; the official runs last 240); in-batch negatives contrast the two current
#   views from the first step;
# - temperature 0.2: at the paper's 0.07 one epoch ends below random init (k-NN 38.5%, linear 56.1%; base_lr
#   0.3 instead of 0.06: 36.6%, 50.6%); at 0.2, k-NN 49.3%, linear 61.6%;
# - nce_k 1024: fewer negatives than the digits' 1,437 bank entries, for runs that ask for a bank loss;
# - min_scale 0.2: the official ``--crop_low`` default; 8% crops of a 32-px image are 9 px wide.
# On the grayscale digits ab is a 1e-5-scaled copy of L (see the docstring), so the two views are the same
# crop and the loss falls only from log 64 = 4.159 to 4.108 per direction in 330 steps; k-NN 86.7%, linear
# 99.2% (the same model at random init 78.1%, 99.2%; the RGB backbone at random init 83.9%); at
# temperature 0.07 the loss stays at log 64 and the k-NN ends at 83.6%.
PRESETS = {"small": dict(loss="batch", temperature=0.2, nce_k=1024, min_scale=0.2)}


# --- augmentations (official train_CMC.py: crop and flip, then Lab) ----------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view per image, random resized crop and flip as the official training transform (no colour
    jitter); L and ab are split from it in ``forward``. Takes a PIL image or a uint8 tensor."""
    return [
        v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])
    ]


# --- Lab views (skimage.color.rgb2lab, sRGB with the D65 white, 2-degree observer) ------------------

XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
WHITE_D65 = (0.95047, 1.0, 1.08883)
# official train_CMC.py: centre and half-width of the L, a and b ranges
LAB_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> (N, 3, H, W) CIE Lab: L in [0, 100], a and b about [-100, 100]."""
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)  # undo the sRGB gamma
    m = torch.tensor(XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,njhw->nihw", m, linear) / white  # (N, 3, H, W), relative to the white point
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856).pow(1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_views(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised RGB (N, 3, H, W) -> (L (N, 1, H, W), ab (N, 2, H, W)), normalised as the official code."""
    with torch.autocast(x.device.type, enabled=False):
        rgb = x.float() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)  # the data set's normalisation undone
        lab = rgb_to_lab(rgb)
        centre = torch.tensor(LAB_MEAN, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor(LAB_STD, device=x.device).view(1, 3, 1, 1)
        lab = (lab - centre) / scale
    return lab[:, :1], lab[:, 1:]


# --- encoders: the backbone with its first convolution made for 1 or 2 channels ---------------------


def adapt_first_conv(net: nn.Module, in_channels: int) -> nn.Module:
    """Replace, in place, the first ``nn.Conv2d`` of ``net`` (``named_modules`` order) by a freshly
    initialised one with ``in_channels`` inputs and otherwise the same settings; returns ``net``."""
    found = next(((name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[0] == "":
        raise ValueError("CMC: the backbone has no nn.Conv2d inside it to adapt to the L and ab channels")
    name, old = found
    if old.groups != 1:
        raise ValueError(f"CMC: the backbone's first convolution {name!r} is grouped; cannot change its inputs")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name), child, new.to(old.weight.device, old.weight.dtype))
    return net


# --- distributed helpers ------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


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


def draw_noise(n_local: int, k: int, num_samples: int, device: torch.device) -> torch.Tensor:
    """(n_local, k) indices uniform on the bank (P_n = 1/n): this rank's rows of an (N_global, k) draw."""
    world, rank = _world()
    idx = torch.randint(num_samples, (world * n_local, k), device=device)
    return idx[rank * n_local : (rank + 1) * n_local]


# --- losses and the banks ------------------------------------------------------------------------------


def nce_loss(scores: torch.Tensor, z, temperature: float, num_samples: int) -> torch.Tensor:
    """NCE of the official NCECriterion, averaged over the N anchors. scores: (N, 1 + K) cosines of each
    anchor with its positive bank entry (column 0) and K noise entries; z: the normaliser Z; num_samples: n."""
    k = scores.shape[1] - 1
    log_z = torch.as_tensor(z, dtype=torch.float64, device=scores.device).log()
    # h = P / (P + K P_n) = sigmoid(log P - log(K / n)), with log P = score / tau - log Z
    a = scores / temperature - (log_z + math.log(k / num_samples))  # (N, 1 + K)
    # -log h = softplus(-a) for the positive, -log(1 - h) = softplus(a) for the noise
    return (F.softplus(-a[:, 0]) + F.softplus(a[:, 1:]).sum(dim=1)).mean()


def softmax_loss(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """L^{V1,V2} as a (K + 1)-way softmax (official NCESoftmaxLoss). scores: (N, 1 + K), the positive in
    column 0."""
    labels = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores / temperature, labels)


def batch_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L^{V1,V2}, L^{V2,V1}) with the other images of the global batch as negatives. z1, z2: (N, D) unit
    embeddings of the two views; each anchor's positive is its own image's other view."""
    all1, offset = gather_with_grad(z1)  # (N_global, D)
    all2, _ = gather_with_grad(z2)
    target = torch.arange(len(z1), device=z1.device) + offset
    loss_12 = F.cross_entropy(z1 @ all2.T / temperature, target)  # (N, N_global): V1 anchors, V2 candidates
    loss_21 = F.cross_entropy(z2 @ all1.T / temperature, target)
    return loss_12, loss_21


@torch.no_grad()
def estimate_z(scores: torch.Tensor, temperature: float, num_samples: int) -> torch.Tensor:
    """Z ~= n mean exp(score / tau) over all K + 1 columns of the global batch's scores (official
    NCEAverage). scores: (N, 1 + K). Returns a float64 scalar, identical on every rank."""
    e = (scores.double() / temperature).exp()
    stats = torch.stack([e.sum(), torch.tensor(float(e.numel()), dtype=torch.float64, device=e.device)])
    if _world()[0] > 1:
        dist.all_reduce(stats)
    return num_samples * stats[0] / stats[1]


@torch.no_grad()
def update_bank(bank: torch.Tensor, index: torch.Tensor, x: torch.Tensor, momentum: float) -> None:
    """bank[i] <- normalise(m bank[i] + (1 - m) x_i) at the rows ``index`` (N,), in place; x: (N, D)."""
    v = momentum * bank[index] + (1 - momentum) * x.to(bank.dtype)  # (N, D)
    bank.index_copy_(0, index, F.normalize(v, dim=1))


# --- model --------------------------------------------------------------------------------------------


class CMC(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.loss not in ("nce", "softmax", "batch"):
            raise ValueError(f"loss must be 'nce', 'softmax' or 'batch', got {cfg.loss!r}")
        self.cfg = cfg
        backbone_ab = copy.deepcopy(backbone)  # before the L encoder's first conv changes
        self.backbone = adapt_first_conv(backbone, 1)  # f_1, on L
        self.backbone_ab = adapt_first_conv(backbone_ab, 2)  # f_2, on ab
        self.head_l = nn.Linear(feature_dim, cfg.proj_dim)
        self.head_ab = nn.Linear(feature_dim, cfg.proj_dim)
        self.register_buffer("rgb_mean", torch.tensor((0.485, 0.456, 0.406)))  # set_normalization replaces them
        self.register_buffer("rgb_std", torch.tensor((0.229, 0.224, 0.225)))
        self.register_buffer("bank_l", torch.empty(0, cfg.proj_dim))  # (n, D) M_1, sized in setup()
        self.register_buffer("bank_ab", torch.empty(0, cfg.proj_dim))  # (n, D) M_2
        # Z of the L-anchored and of the ab-anchored scores; < 0: not estimated yet
        self.register_buffer("nce_z", torch.full((2,), -1.0, dtype=torch.float64))
        self._z_known = False  # caches "nce_z >= 0" so that the check does not read the device every step

    def set_normalization(self, mean, std) -> None:
        """The data set's per-channel mean and std, undone before the Lab conversion."""
        self.rgb_mean.copy_(torch.as_tensor(mean, dtype=self.rgb_mean.dtype))
        self.rgb_std.copy_(torch.as_tensor(std, dtype=self.rgb_std.dtype))

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The two banks, one unit random vector per training image each, drawn as the official code does."""
        if self.cfg.loss == "batch":
            return  # in-batch negatives: no bank
        stdv = 1.0 / math.sqrt(self.cfg.proj_dim / 3)
        device = self.head_l.weight.device
        for name in ("bank_l", "bank_ab"):
            bank = torch.rand(num_samples, self.cfg.proj_dim, device=device) * 2 * stdv - stdv  # (n, D)
            setattr(self, name, F.normalize(bank, dim=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised RGB (N, 3, H, W) -> backbone features of L and of ab, (N, feature_dim) each."""
        lum, ab = lab_views(x, self.rgb_mean, self.rgb_std)
        return self.backbone(lum), self.backbone_ab(ab)

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        x, index = batch["views"][0], batch["index"]  # (N, 3, H, W), (N,)
        h_l, h_ab = self.encode(x)
        z_l = F.normalize(self.head_l(h_l), dim=1)  # (N, D)
        z_ab = F.normalize(self.head_ab(h_ab), dim=1)
        with torch.autocast(x.device.type, enabled=False):  # scores and the loss in float32
            z_l, z_ab = z_l.float(), z_ab.float()
            if cfg.loss == "batch":
                loss_l, loss_ab = batch_loss(z_l, z_ab, cfg.temperature)
                pos_sim = (z_l * z_ab).sum(dim=1).mean().detach()
            else:
                loss_l, loss_ab, pos_sim = self._bank_losses(z_l, z_ab, index)
            loss = loss_l + loss_ab  # L(V1, V2) = L^{V1,V2} + L^{V2,V1}
        return {"loss": loss, "loss_l": loss_l.detach(), "loss_ab": loss_ab.detach(), "pos_sim": pos_sim}

    def _bank_losses(self, z_l: torch.Tensor, z_ab: torch.Tensor, index: torch.Tensor):
        cfg, n = self.cfg, self.bank_l.shape[0]
        if n == 0:
            raise RuntimeError("CMC: call setup(num_samples, num_classes) to allocate the memory banks first")
        noise = draw_noise(len(index), cfg.nce_k, n, z_l.device)  # (N, K), shared by both directions
        idx = torch.cat([index[:, None], noise], dim=1)  # (N, 1 + K): the positive in column 0
        # copies of the rows (advanced indexing), so the in-place bank update below leaves them intact
        scores_l = torch.bmm(self.bank_ab[idx], z_l.unsqueeze(2)).squeeze(2)  # (N, 1 + K): L anchor vs M_2
        scores_ab = torch.bmm(self.bank_l[idx], z_ab.unsqueeze(2)).squeeze(2)  # ab anchor vs M_1
        if cfg.loss == "nce":
            if not self._z_known:
                if self.nce_z[0] < 0:  # the first batch: estimate Z per direction, then keep it fixed
                    self.nce_z.copy_(torch.stack([estimate_z(s.detach(), cfg.temperature, n)
                                                  for s in (scores_l, scores_ab)]))
                self._z_known = True
            loss_l = nce_loss(scores_l, self.nce_z[0], cfg.temperature, n)
            loss_ab = nce_loss(scores_ab, self.nce_z[1], cfg.temperature, n)
        else:
            loss_l = softmax_loss(scores_l, cfg.temperature)
            loss_ab = softmax_loss(scores_ab, cfg.temperature)
        pos_sim = 0.5 * (scores_l[:, 0] + scores_ab[:, 0]).mean().detach()  # cosine with the other view's entry
        # after the loss, without gradient, with the global batch so that every rank's banks stay the same
        index_all = concat_all_gather(index)
        update_bank(self.bank_l, index_all, concat_all_gather(z_l.detach()), cfg.bank_momentum)
        update_bank(self.bank_ab, index_all, concat_all_gather(z_ab.detach()), cfg.bank_momentum)
        return loss_l, loss_ab, pos_sim

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[f_1(L), f_2(ab)]: both encoders' pooled features, concatenated (the paper's linear evaluation)."""
        return torch.cat(self.encode(x), dim=1)  # (N, 2 feature_dim)


MODEL = CMC


if __name__ == "__main__":
    rgb = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]).view(2, 3, 1, 1)
    print("Lab of red and white:", rgb_to_lab(rgb).flatten(1).tolist())
    z1, z2 = F.normalize(torch.randn(8, 128), dim=1), F.normalize(torch.randn(8, 128), dim=1)
    print("in-batch, random:", sum(batch_loss(z1, z2, 0.07)).item(),
          "aligned:", sum(batch_loss(z1, z1, 0.07)).item())
