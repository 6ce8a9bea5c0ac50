"""InstDisc — Wu, Xiong, Yu, Lin. "Unsupervised Feature Learning via Non-Parametric Instance Discrimination".
CVPR 2018, arXiv:1805.01978. Catalog id: ``instdisc``. Official code: zhirongw/lemniscate.pytorch.

Every training image is its own class. The network maps x_i to f_i = normalise(W g(x_i)) in 128-d (the
classifier replaced by a linear layer, then L2 normalisation), and a memory bank V holds one unit vector
v_j per training image. The class weights of the softmax are the bank entries themselves (Sec. 3.1):

    P(i | f) = exp(v_i . f / tau) / Z,    Z = sum_{j=1..n} exp(v_j . f / tau).

``loss="softmax"`` minimises -log P(i | f_i) exactly, over the whole bank. ``loss="nce"`` (the default)
uses noise-contrastive estimation (Sec. 3.2): with m noise indices j_1..j_m drawn uniformly
(P_n = 1/n), h(j, f) = P(j | f) / (P(j | f) + m P_n), and per sample

    J_NCE = -log h(i, f_i) - sum_{k=1..m} log(1 - h(j_k, f_i)),

where Z is a constant, estimated once by Monte Carlo from the first batch's noise samples,
Z ~= n mean_{i,k} exp(v_{j_k} . f_i / tau), and then fixed. Proximal regularisation (Sec. 3.3) adds, for
the positive, lambd ||v_i^(t) - v_i^(t-1)||^2: v_i^(t) is f_i from this iteration's network (it gets the
gradient), v_i^(t-1) is the bank entry before this step's update (a constant), so for unit vectors the term
is 2 lambd (1 - f_i . v_i), a pull towards the instance's own past representation. After the loss, without
gradient, the bank is updated at the batch's indices: v_i <- normalise(mu v_i + (1 - mu) f_i), mu = 0.5
(official code, ``--nce-m``).

Collapse: the m noise samples (the whole bank for the softmax) are negatives. Features that cannot be told
apart give P(j | f) the same value for every j, the loss of indistinguishable instances (log n for the
softmax, log(m + 1) + m log(1 + 1/m) for NCE with Z estimated there); only spreading the instances over
the sphere lowers it.

Distributed: the bank and Z must be identical on every rank. The bank is updated with the features and
indices of the GLOBAL batch (all-gathered without gradient, then written alike on every rank), and Z is
estimated from the noise scores of the global batch (an all-reduce). Each sample's loss needs only f_i, its
own noise samples and the bank, so the mean over ranks of the per-rank mean is the loss of the global
batch, and DDP's gradient averaging does the rest. Noise indices: each rank draws an (N_global, m) block from
its own step RNG and keeps its rows. The harness seeds ranks differently, so ranks get independent, uniform
noise (which is all that NCE asks); with the same seed on every rank the draw equals that of one process on
the concatenated batch, row for row, which is what the shared torchrun check compares.

Deviations:
- learning rate: the harness decays it with a cosine; the paper divides it by 10 at epochs 120 and 160;
- bank initialisation: uniform in [-sqrt(3/D), sqrt(3/D)] as the official code draws it, then normalised,
  so that the entries are unit random vectors as the paper says (Sec. 3.2); the official code does not
  normalise (its entries have unit norm only in expectation);
- Z averages the noise samples only, as the paper's Monte-Carlo estimate does; the official code also
  averages in the positive's score (one column in m + 1);
- the proximal term is the paper's (Sec. 3.3); the released code has none (there the bank momentum is what
  smooths the training, its README says);
- the horizontal flip comes right after the crop instead of last: it commutes with the per-pixel colour
  operations, the distribution of views is unchanged, and large images can then be cropped and flipped per
  image with the colour operations batched on the device;
- evaluation uses the backbone features (``embed``); the paper's k-NN uses the normalised 128-d features;
- biases and BN parameters get no weight decay (the harness's optimizer groups); the official code decays all.

Cost: each sample gathers its own m noise entries, an (N, m, D) tensor as in the official code (512 MB at
N = 256, m = 4096, D = 128); the softmax scores the whole bank, (N, n).
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
    dim: int = 128
    """Dimension of the normalised embedding f and of the bank entries (Sec. 3.1; official ``--low-dim``)."""
    loss: str = "nce"
    """``"nce"``: NCE with m noise samples (Sec. 3.2); ``"softmax"``: the full non-parametric softmax over the
    bank (Sec. 3.1; official ``--nce-k 0``; the paper compares both on CIFAR-10, Sec. 4)."""
    nce_k: int = 4096
    """m, noise samples per instance, drawn uniformly from the bank (Sec. 4; official ``--nce-k``)."""
    temperature: float = 0.07
    """tau (Sec. 4; official ``--nce-t``; its CIFAR script uses 0.1)."""
    bank_momentum: float = 0.5
    """mu in v <- normalise(mu v + (1 - mu) f) (official ``--nce-m``, README: 0.5 works well)."""
    prox_lambda: float = 30.0
    """lambd of the proximal term (Sec. 3.3); 0 disables it, as in the released code."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop (official main.py: scale=(0.2, 1.))."""
    optimizer: str = "sgd"
    """SGD with momentum (Sec. 4)."""
    base_lr: float = 0.03
    """lr 0.03 at batch 256 (Sec. 4; official README)."""
    weight_decay: float = 1e-4
    """Official main.py default for ImageNet (the README's command keeps it); its CIFAR script uses 5e-4."""
    momentum: float = 0.9
    """Official main.py."""
    warmup_epochs: int = 0
    """No warm-up: the rate starts at 0.03 (Sec. 4)."""
    epochs: int = 200
    """Sec. 4 (lr / 10 after 120 and 160 epochs; the harness uses a cosine instead)."""
    batch_size: int = 256
    """Sec. 4; official main.py."""
    sync_batchnorm: bool = False
    """The official code trains with DataParallel: BN statistics per GPU."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# k-NN figures are from `selfsup train instdisc --set ...` runs, random init 0.839):
# - loss "softmax": with n = 1,437 the exact softmax of Sec. 3.1 is cheap (64 x 1,437 scores a step), and NCE
#   with Z fixed at its first-batch value diverges here: the bank is rewritten every 22 steps with features
#   of the random-init network, which are nearly parallel (cosine ~0.95), so the noise scores soon exceed
#   the Z estimated on the random bank by ~e^13 and the noise term saturates (NCE loss 30-40, k-NN 0.33-0.67);
#   on ImageNet the bank refills over 5,000 steps while the network learns to spread;
# - temperature 0.2, base_lr 0.003, prox_lambda 0: at the paper's 0.07, 0.03 and 30 the 330 steps end below
#   random init (softmax 0.64; NCE collapses). The paper's rate needs more epochs here (60 epochs at
#   base_lr 0.03, tau 0.07: 0.922); in 330 steps, base_lr 0.03/0.01/0.003/0.001 give 0.72/0.86/0.89/0.86
#   at tau 0.2, and tau 0.07/0.1/0.2 give 0.74/0.76/0.86 at base_lr 0.01. lambd 30 pins f_i to its bank entry (cosine 0.999) and the softmax stays
#   at log n (7.26 for 7.27): nothing is discriminated; the released code has no proximal term either;
# - nce_k 512: fewer noise samples than bank entries, for runs that ask for ``--set loss=nce``;
# - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as SimCLR's small preset;
#   0.2 gives 0.878, 0.4 gives 0.889).
PRESETS = {"small": dict(loss="softmax", temperature=0.2, base_lr=0.003, prox_lambda=0.0, nce_k=512, min_scale=0.4)}


# --- augmentations (official main.py: crop, grayscale, colour jitter, flip) -------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view per image: random resized crop, flip, grayscale (p=0.2), colour jitter 0.4 (always), as in
    the official main.py (the flip moved forward, see Deviations). Takes a PIL image or a uint8 tensor."""
    return [
        v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])
    ]


# --- distributed helpers (no gradient: the bank and Z are constants of the loss) ---------------------


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


def draw_noise(n_local: int, k: int, num_samples: int, device: torch.device) -> torch.Tensor:
    """(n_local, k) indices uniform on the bank (P_n = 1/n): this rank's rows of an (N_global, k) draw."""
    world, rank = _world()
    idx = torch.randint(num_samples, (world * n_local, k), device=device)
    return idx[rank * n_local : (rank + 1) * n_local]


# --- losses and the bank ------------------------------------------------------------------------------


def nce_loss(pos_sim: torch.Tensor, noise_sim: torch.Tensor, z, temperature: float, num_samples: int) -> torch.Tensor:
    """J_NCE of Sec. 3.2 averaged over the batch. pos_sim: (N,) v_i . f_i; noise_sim: (N, m) v_{j_k} . f_i;
    z: the normaliser Z; num_samples: n (P_n = 1/n)."""
    m = noise_sim.shape[1]
    log_z = torch.as_tensor(z, dtype=torch.float64, device=pos_sim.device).log()
    shift = log_z + math.log(m / num_samples)  # log Z + log(m P_n)
    # h = P / (P + m P_n) = sigmoid(log P - log(m P_n)), with log P = v . f / tau - log Z
    a_pos = pos_sim / temperature - shift  # (N,)
    a_noise = noise_sim / temperature - shift  # (N, m)
    # -log h = softplus(-a), -log(1 - h) = softplus(a): exact and stable
    return (F.softplus(-a_pos) + F.softplus(a_noise).sum(dim=1)).mean()


def softmax_loss(f: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log P(i | f_i) over the whole bank (Sec. 3.1). f: (N, D) unit features; bank: (n, D); index: (N,)."""
    logits = f @ bank.T / temperature  # (N, n)
    return F.cross_entropy(logits, index)


def proximal_term(f: torch.Tensor, v_prev: torch.Tensor, lambd: float) -> torch.Tensor:
    """lambd ||v_i^(t) - v_i^(t-1)||^2 (Sec. 3.3) averaged over the batch. f: (N, D) this step's features;
    v_prev: (N, D) their bank entries before the update (no gradient)."""
    return lambd * (f - v_prev.detach()).pow(2).sum(dim=1).mean()


@torch.no_grad()
def estimate_z(noise_sim: torch.Tensor, temperature: float, num_samples: int) -> torch.Tensor:
    """Monte-Carlo normaliser Z ~= n mean_{i,k} exp(v_{j_k} . f_i / tau) over the noise samples of the global
    batch (Sec. 3.2). noise_sim: (N, m). Returns a float64 scalar, identical on every rank."""
    e = (noise_sim.double() / temperature).exp()
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


class InstDisc(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.loss not in ("nce", "softmax"):
            raise ValueError(f"loss must be 'nce' or 'softmax', got {cfg.loss!r}")
        self.cfg = cfg
        self.backbone = backbone
        self.projector = nn.Linear(feature_dim, cfg.dim)  # the classifier replaced by a 128-d layer (Sec. 3.1)
        self.register_buffer("bank", torch.empty(0, cfg.dim))  # (n, D), sized in setup()
        self.register_buffer("z", torch.tensor(-1.0, dtype=torch.float64))  # Z; < 0: not estimated yet
        self._z_known = False  # caches "z >= 0" so that the check does not read the device every step

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The bank: one unit random vector per training image (Sec. 3.2), drawn as the official code does."""
        stdv = 1.0 / math.sqrt(self.cfg.dim / 3)
        device = self.projector.weight.device
        bank = torch.rand(num_samples, self.cfg.dim, device=device) * 2 * stdv - stdv  # (n, D)
        self.bank = F.normalize(bank, dim=1)

    def forward(self, batch: dict) -> dict:
        if self.bank.shape[0] == 0:
            raise RuntimeError("InstDisc: call setup(num_samples, num_classes) to allocate the memory bank first")
        cfg, n = self.cfg, self.bank.shape[0]
        x, index = batch["views"][0], batch["index"]  # (N, C, H, W), (N,)
        f = F.normalize(self.projector(self.backbone(x)), dim=1)  # (N, D)
        with torch.autocast(x.device.type, enabled=False):  # scores and the loss in float32
            f = f.float()
            v_pos = self.bank[index]  # (N, D) v_i^(t-1): a copy, so the update below leaves it intact
            if cfg.loss == "nce":
                noise = draw_noise(f.shape[0], cfg.nce_k, n, f.device)  # (N, m)
                pos_sim = (v_pos * f).sum(dim=1)  # (N,)
                noise_sim = torch.bmm(self.bank[noise], f.unsqueeze(2)).squeeze(2)  # (N, m, D) x (N, D, 1) -> (N, m)
                if not self._z_known:
                    if self.z < 0:  # the first batch: estimate Z, then keep it fixed
                        self.z.copy_(estimate_z(noise_sim.detach(), cfg.temperature, n))
                    self._z_known = True
                main = nce_loss(pos_sim, noise_sim, self.z, cfg.temperature, n)
            else:
                # a copy: the matrix product keeps its operand for the backward pass, the update is in place
                main = softmax_loss(f, self.bank.clone(), index, cfg.temperature)
            prox = proximal_term(f, v_pos, cfg.prox_lambda)
            loss = main + prox  # Sec. 3.3: the proximal term on the positive
        # after the loss, without gradient, with the global batch so that every rank's bank stays the same
        update_bank(self.bank, concat_all_gather(index), concat_all_gather(f.detach()), cfg.bank_momentum)
        with torch.no_grad():
            agreement = (v_pos * f).sum(dim=1).mean()  # cosine of f_i with its own bank entry
        return {"loss": loss, cfg.loss: main.detach(), "prox": prox.detach(), "pos_sim": agreement}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (the harness's k-NN and probes; the paper's k-NN uses normalise(W g(x)))."""
        return self.backbone(x)


MODEL = InstDisc


if __name__ == "__main__":
    n, m, t = 1000, 64, 0.07
    bank = F.normalize(torch.randn(n, 128), dim=1)
    f, index = F.normalize(torch.randn(8, 128), dim=1), torch.arange(8)
    noise_sim = f.unsqueeze(1).mul(bank[torch.randint(n, (8, m))]).sum(-1)  # (8, m)
    z = estimate_z(noise_sim, t, n)
    print("NCE random:", nce_loss((bank[index] * f).sum(1), noise_sim, z, t, n).item(),
          "aligned:", nce_loss(torch.ones(8), noise_sim, z, t, n).item())
