"""PIRL — Misra, van der Maaten. "Self-Supervised Learning of Pretext-Invariant Representations". CVPR 2020,
arXiv:1912.01991. Catalog id: ``pirl``. Official code: none with the paper; the reference implementation
is VISSL's (facebookresearch/vissl, configs/config/pretrain/pirl, written by the first author).

The representation of an image I should not change under the jigsaw transformation t: the image is cut
into a 3x3 grid, a random crop is taken inside each cell, and the nine tiles are shuffled. With the
network's features v_I of the image and v_{I^t} of each tile, two heads map them to 128-d: f(v_I) is a
linear projection of the image's features; g(v_{I^t}) projects each tile's features linearly, concatenates
the nine projections in the shuffled order and projects the concatenation linearly. With s(a, b) the
cosine similarity and N negatives drawn uniformly from the data set D (|D| = n images) without I, the
noise-contrastive estimator models the probability that a pair comes from the data as (Eq. 2)

    h(a, b) = exp(s(a, b) / tau) / (exp(s(a, b) / tau) + N / n) = sigmoid(s(a, b) / tau - log(N / n)),

a logistic classifier of the pair's cosine against N noise samples of probability 1/n each. A memory
bank holds m_I, an exponential moving average of f(v_I) for every image; the loss of an anchor a against
the bank (Eqs. 3, 4) is

    L_NCE(m_I, a) = -log h(m_I, a) - sum_{I' in D_N} log(1 - h(a, m_{I'})),

and PIRL's loss is the convex combination (Eq. 5), lambda = 0.5,

    L(I, I^t) = lambda L_NCE(m_I, g(v_{I^t})) + (1 - lambda) L_NCE(m_I, f(v_I)).

After the loss, without gradient, m_I <- normalise(mu m_I + (1 - mu) f(v_I)), mu = 0.5 (VISSL's memory
momentum), at the batch's indices.

The normaliser: Eq. 2 as printed scores exp(s / tau) itself against N / n. The reference implementation
(VISSL's ``nce_loss_with_memory`` with ``norm_constant: -1``, by the first author) divides exp(s / tau) by
a constant Z = n mean exp(s / tau), estimated on the first batch (positive and negative scores of the
jigsaw term) and then fixed, as InstDisc does: h = sigmoid(s / tau - log Z - log(N / n)). ``estimate_z``
(default True, the reference) chooses; with Z = 1 a cosine near 0 already gives h = 1 / (1 + N / n),
about 0.98 for ImageNet's N / n = 32,000 / 1.28 M, so every negative's term saturates, its gradient is
the same 1 / tau for all of them, and nothing but the bank's mean is pushed away (on the digits: k-NN
27.5%, RankMe 2.8). ``loss="softmax"`` puts a (1 + N)-way softmax of the same scores in place of each NCE
term (VISSL's ``loss_type: cross_entropy``).

Views: the harness makes two standard views per image (batched on the device): the image view I (a random
resized crop, flip, colour jitter, grayscale) and the view the tiles are cut from (a larger random crop,
scale 0.6-1, as VISSL's 255-px patch crop, with the same colour operations). ``forward`` cuts the second
view into the 3x3 grid (cells of H // 3 px, centred), takes a random crop of 64/85 of the cell side inside
every cell (the paper's 64-px tiles in 85-px cells, scaled to the image size), draws a random permutation
of the nine per image, and encodes all N x 9 tiles with the shared backbone in one batch.

Collapse: the N negatives of the bank. Features that cannot be told apart give every pair the same
score: with Z estimated there h = 1 / (N + 1) for every pair, the loss of indistinguishable instances,
log(N + 1) + N log(1 + 1 / N) per term (log(N + 1) for the softmax), and only spreading the images over
the sphere lowers it. The bank is a constant of the loss (stop-gradient).

Distributed: the bank must be identical on every rank: it is updated with f(v_I) and the indices of the
GLOBAL batch (all-gathered without gradient, then written alike on every rank). Each sample's loss needs only
its own embeddings, its negatives and the bank, so the mean over ranks of the per-rank mean is the loss of
the global batch, and DDP's gradient averaging does the rest. The random draws of ``forward`` (tile crops,
permutations, negatives) are made for the global batch from each rank's step RNG and each rank keeps its
rows: with the harness's per-rank seeds they are independent, with the same seed on every rank they equal
one process on the concatenated batch, which is what the shared torchrun check compares.

Deviations:
- the colour operations and the flip of the tile view are drawn once per image, shared by its nine tiles;
  VISSL jitters, grays and flips every tile independently (per-tile colour jitter has no batched form
  here). VISSL's extra photometric set (posterise, sharpen, solarise, autocontrast with p = 0.66) is left
  out: it is not in the paper and has no batched counterpart in the harness;
- the flip comes right after the crop (VISSL flips last): it commutes with the per-pixel colour operations,
  so the distribution of views is unchanged;
- the tile view has the image view's size (the paper's tiles come from a 255-px crop beside 224-px images);
  the tile offsets take every position in the cell (VISSL's leave out the last one);
- negatives: drawn with replacement, uniform over the other n - 1 images (the paper: uniform over D without I);
- the normaliser Z of the reference implementation by default, not Eq. 2's Z = 1 (see above);
- learning rate: warm-up-free cosine as VISSL's config; biases and BN parameters get no weight decay (the
  harness's optimizer groups; VISSL's ``regularize_bn: False, regularize_bias: False`` as well);
- evaluation uses the backbone features of the whole image (``embed``), as the paper's linear evaluation.

Cost: the backbone runs on N images and 9 N tiles (of (64/85 / 3)^2 = 1/16 the image's area each); each
anchor gathers its N negatives from the bank, an (N, N_neg, D) tensor (4 GB at N = 256, N_neg = 32,000,
D = 128 in float32; VISSL runs 32 images per GPU).
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
    proj_dim: int = 128
    """Dimension of f, g and the bank entries (128-d in the paper; VISSL ``embedding_dim``)."""
    temperature: float = 0.07
    """tau of Eq. 2 (0.07 in the paper; VISSL ``temperature``)."""
    num_negatives: int = 32000
    """N, negatives drawn from the bank per anchor (32,000 in the paper's ImageNet runs; VISSL
    ``num_negatives``)."""
    bank_momentum: float = 0.5
    """mu of the memory bank's moving average m_I (0.5, VISSL ``memory_params.momentum``)."""
    loss: str = "nce"
    """``"nce"``: the NCE of Eqs. 2-4 (the paper); ``"softmax"``: a (1 + N)-way softmax over the same scores,
    cross-entropy with the positive m_I (VISSL ``loss_type: cross_entropy``, "the InfoNCE loss")."""
    estimate_z: bool = True
    """True: exp(s / tau) is divided by a normaliser Z = n mean exp(s / tau), estimated on the first batch's
    jigsaw scores and then fixed, as the reference implementation (VISSL ``nce_loss_with_memory``,
    ``norm_constant: -1``); False: Eq. 2 as printed, Z = 1 (its noise term saturates, see Deviations)."""
    lambd: float = 0.5
    """lambda of Eq. 5 (0.5 in the paper; VISSL ``loss_weights: [0.5, 0.5]``)."""
    grid: int = 3
    """The jigsaw grid, grid x grid tiles (nine in the paper; VISSL ``num_patches: 9``)."""
    tile_fraction: float = 64 / 85
    """Tile side over cell side: 64-px tiles cropped inside 85-px cells of a 255-px crop (VISSL
    ``crop_size_patches: 255`` and ``patch_jitter: 21``)."""
    min_scale: float = 0.08
    """Smallest area fraction of the image view's random resized crop (VISSL ``crop_scale_image``)."""
    tile_min_scale: float = 0.6
    """Smallest area fraction of the crop the tiles are cut from (VISSL ``crop_scale_patches``)."""
    optimizer: str = "sgd"
    """SGD with momentum 0.9, no Nesterov (VISSL config)."""
    base_lr: float = 0.03
    """lr 0.03 per 256 images, linearly scaled (0.12 at batch 1024), cosine decay (VISSL
    ``auto_lr_scaling``)."""
    weight_decay: float = 1e-4
    """VISSL config."""
    momentum: float = 0.9
    """VISSL config."""
    warmup_epochs: int = 0
    """No warm-up (VISSL config)."""
    epochs: int = 800
    """VISSL config (its model zoo also has 200-epoch models)."""
    batch_size: int = 1024
    """32 images on each of 32 GPUs (VISSL config: 4 nodes of 8 GPUs, ``BATCHSIZE_PER_REPLICA: 32``)."""
    sync_batchnorm: bool = False
    """Not stated in the paper; VISSL's config keeps BN statistics per GPU."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 32 px, 330 steps at batch
# 64; k-NN figures from `selfsup train pirl --set ...` at min_scale 0.4, random init 0.839; "110 steps": a
# shorter run of the same schedule):
# - loss "softmax": NCE with a fixed normaliser does not settle here. The bank is rewritten every 22 steps
#   with the nearly parallel features of the young network (cosine ~0.8 at init), so the noise scores leave
#   the range of the Z estimated on the random bank and the noise term, summed over N negatives, outweighs
#   the positive's pull (the same failure as InstDisc's NCE on the digits). With Z estimated and N 256,
#   110 steps give 0.72 (tau 0.2, base_lr 0.003; N 64: 0.75), 0.63 (tau 0.1, 0.001), 0.69 and 0.81
#   (tau 0.5, 0.03 and 0.003), the loss rising or flat (at tau 0.2, base_lr 0.03 it rises from 6.9 to 10
#   in 100 steps). Eq. 2's Z = 1 collapses (0.275, RankMe 2.8; N 256, tau 0.07, 330 steps). The softmax
#   over the same scores (VISSL's cross-entropy option) keeps the pull and the push balanced;
# - num_negatives 1024: below the 1,437 images (the paper's 32,000 is 2.5% of ImageNet);
# - temperature 0.2 and base_lr 0.01: base_lr 0.003/0.01/0.03 give 0.847/0.858/0.742 at tau 0.2, num_negatives
#   1024 (InstDisc's softmax preferred tau 0.2 to 0.07 and 0.1 here; the paper's 0.07 was not tried);
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as SimCLR's small preset).
PRESETS = {"small": dict(loss="softmax", num_negatives=1024, temperature=0.2, base_lr=0.01, min_scale=0.4)}


# --- augmentations (VISSL config: crops, colour jitter, grayscale, flip) -------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """[image view I, the view the jigsaw tiles are cut from in ``forward``]: random resized crops (scale
    from 0.08 and from 0.6), flip, colour jitter (0.4, 0.4, 0.4, 0.2) on every image, grayscale p = 0.2
    (VISSL's PIRL config; the flip moved forward, see Deviations). Take a PIL image or a uint8 tensor."""

    def view(min_scale: float) -> v2.Compose:
        return v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.2),
            v2.RandomGrayscale(p=0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])

    return [view(cfg.min_scale), view(cfg.tile_min_scale)]


# --- the jigsaw transformation (on tensors, inside forward) ----------------------------------------


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _local_rows(x: torch.Tensor, n_local: int) -> torch.Tensor:
    """This rank's rows of a draw made for the global batch (x: (world * n_local, ...))."""
    _, rank = _world()
    return x[rank * n_local : (rank + 1) * n_local]


def jigsaw(x: torch.Tensor, grid: int, tile_fraction: float) -> torch.Tensor:
    """The jigsaw view I^t of x (N, C, H, W): a grid x grid partition (cells of H // grid by W // grid px,
    centred), a random crop of ``tile_fraction`` of the cell side inside every cell, the tiles of each image in
    a random order. Returns (N, grid^2, C, t_h, t_w), the tiles in their shuffled order."""
    n, _, h, w = x.shape
    world, _ = _world()
    cell_h, cell_w = h // grid, w // grid
    if cell_h < 1 or cell_w < 1:
        raise ValueError(f"PIRL: a {h}x{w} view cannot be cut into a {grid}x{grid} grid of tiles")
    t_h, t_w = max(1, round(cell_h * tile_fraction)), max(1, round(cell_w * tile_fraction))
    k = grid * grid
    # drawn for the global batch, this rank's rows (see Distributed)
    perm = _local_rows(torch.rand(world * n, k, device=x.device).argsort(dim=1), n)  # (N, 9): cell of each tile
    u = _local_rows(torch.rand(world * n, k, 2, device=x.device), n)  # (N, 9, 2): offsets inside the cells
    off_y = (u[..., 0] * (cell_h - t_h + 1)).long().clamp_max(cell_h - t_h)
    off_x = (u[..., 1] * (cell_w - t_w + 1)).long().clamp_max(cell_w - t_w)
    top = (h - grid * cell_h) // 2 + torch.div(perm, grid, rounding_mode="floor") * cell_h + off_y  # (N, 9)
    left = (w - grid * cell_w) // 2 + (perm % grid) * cell_w + off_x
    rows = top[:, :, None] + torch.arange(t_h, device=x.device)  # (N, 9, t_h)
    cols = left[:, :, None] + torch.arange(t_w, device=x.device)  # (N, 9, t_w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    tiles = x[batch, :, rows[:, :, :, None], cols[:, :, None, :]]  # (N, 9, t_h, t_w, C)
    return tiles.permute(0, 1, 4, 2, 3)


# --- heads ----------------------------------------------------------------------------------------


class JigsawHead(nn.Module):
    """g: a linear projection of each tile's features, the nine concatenated in their (shuffled) order, a
    linear projection of the concatenation (VISSL's PIRL heads: linear 2048 -> 128, concat, linear
    1152 -> 128)."""

    def __init__(self, feature_dim: int, dim: int, tiles: int):
        super().__init__()
        self.tile = nn.Linear(feature_dim, dim)
        self.joint = nn.Linear(tiles * dim, dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v: (N, 9, feature_dim) tile features in the shuffled order -> (N, dim)."""
        return self.joint(self.tile(v).flatten(1))  # (N, 9, dim) -> (N, 9 dim) -> (N, dim)


# --- loss and the bank ------------------------------------------------------------------------------


def nce_loss(pos_sim: torch.Tensor, neg_sim: torch.Tensor, temperature: float, num_samples: int,
             z=1.0) -> torch.Tensor:
    """L_NCE(m_I, a) (Eqs. 2-4) averaged over the batch. pos_sim: (N,) s(m_I, a); neg_sim: (N, N_neg) s(a,
    m_I') for the negatives I'; num_samples: n = |D|; z: the normaliser Z (1: Eq. 2 as printed).
    h = (exp(s / tau) / Z) / (exp(s / tau) / Z + N_neg / n) = sigmoid(s / tau - log Z - log(N_neg / n))."""
    log_z = torch.as_tensor(z, dtype=torch.float64, device=pos_sim.device).log()
    shift = log_z + math.log(neg_sim.shape[1] / num_samples)
    # -log h = softplus(-(s / tau - shift)), -log(1 - h) = softplus(s / tau - shift): exact and stable
    pos = F.softplus(shift - pos_sim / temperature)  # (N,)
    noise = F.softplus(neg_sim / temperature - shift).sum(dim=1)  # (N,)
    return (pos + noise).mean()


def scores(a: torch.Tensor, m_pos: torch.Tensor, m_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines (s(m_I, a) (N,), s(a, m_I') (N, N_neg)) of anchors a (N, D) with their bank entries m_pos
    (N, D) and their negatives' m_neg (N, N_neg, D); everything is L2-normalised here."""
    a = F.normalize(a, dim=1)
    m_pos, m_neg = F.normalize(m_pos.detach(), dim=1), F.normalize(m_neg.detach(), dim=2)
    return (m_pos * a).sum(dim=1), torch.bmm(m_neg, a.unsqueeze(2)).squeeze(2)


def softmax_loss(pos_sim: torch.Tensor, neg_sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log exp(s(m_I, a) / tau) / (exp(s(m_I, a) / tau) + sum_{I'} exp(s(a, m_I') / tau)), averaged over
    the batch (VISSL's ``cross_entropy`` loss type). pos_sim: (N,); neg_sim: (N, N_neg)."""
    logits = torch.cat([pos_sim[:, None], neg_sim], dim=1) / temperature  # (N, 1 + N_neg)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def pirl_loss(g: torch.Tensor, f: torch.Tensor, m_pos: torch.Tensor, m_neg: torch.Tensor, lambd: float,
              temperature: float, num_samples: int, z=1.0, loss: str = "nce") -> tuple[torch.Tensor, ...]:
    """(L, L_NCE(m_I, g), L_NCE(m_I, f)) of Eq. 5. g, f: (N, D) the jigsaw and image embeddings; m_pos: (N, D)
    m_I; m_neg: (N, N_neg, D) the negatives' bank entries; z: the normaliser (1: Eq. 2 as printed);
    loss: ``"softmax"`` puts the softmax in place of each NCE term."""
    if loss == "softmax":
        term_g = softmax_loss(*scores(g, m_pos, m_neg), temperature)
        term_f = softmax_loss(*scores(f, m_pos, m_neg), temperature)
    else:
        term_g = nce_loss(*scores(g, m_pos, m_neg), temperature, num_samples, z)
        term_f = nce_loss(*scores(f, m_pos, m_neg), temperature, num_samples, z)
    return lambd * term_g + (1 - lambd) * term_f, term_g, term_f  # Eq. 5


@torch.no_grad()
def estimate_z(pos_sim: torch.Tensor, neg_sim: torch.Tensor, temperature: float,
               num_samples: int) -> torch.Tensor:
    """Z ~= n mean exp(s / tau) over the positive and negative scores of the global batch (VISSL's
    NCEAverage). pos_sim: (N,); neg_sim: (N, N_neg). Returns a float64 scalar, identical on every rank."""
    e = (torch.cat([pos_sim[:, None], neg_sim], dim=1).double() / temperature).exp()  # (N, 1 + N_neg)
    stats = torch.stack([e.sum(), torch.tensor(float(e.numel()), dtype=torch.float64, device=e.device)])
    if _world()[0] > 1:
        dist.all_reduce(stats)
    return num_samples * stats[0] / stats[1]


def draw_negatives(index: torch.Tensor, k: int, num_samples: int) -> torch.Tensor:
    """(N, k) indices uniform over the n - 1 images other than each row's own (index: (N,)): this rank's rows
    of an (N_global, k) draw."""
    world, _ = _world()
    j = _local_rows(torch.randint(num_samples - 1, (world * len(index), k), device=index.device), len(index))
    return j + (j >= index[:, None]).long()  # skip the image itself


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def update_bank(bank: torch.Tensor, index: torch.Tensor, x: torch.Tensor, momentum: float) -> None:
    """bank[i] <- normalise(m bank[i] + (1 - m) x_i) at the rows ``index`` (N,), in place; x: (N, D)."""
    v = momentum * bank[index] + (1 - momentum) * x.to(bank.dtype)  # (N, D)
    bank.index_copy_(0, index, F.normalize(v, dim=1))


# --- model --------------------------------------------------------------------------------------------


class PIRL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.loss not in ("nce", "softmax"):
            raise ValueError(f"loss must be 'nce' or 'softmax', got {cfg.loss!r}")
        self.cfg = cfg
        self.backbone = backbone  # Phi, shared by the image and its tiles
        self.head_f = nn.Linear(feature_dim, cfg.proj_dim)  # f: a linear projection of v_I
        self.head_g = JigsawHead(feature_dim, cfg.proj_dim, cfg.grid * cfg.grid)
        self.register_buffer("bank", torch.empty(0, cfg.proj_dim))  # (n, D) m_I, sized in setup()
        # Z: < 0 until estimated on the first batch; 1 (Eq. 2 as printed) without estimate_z or with the softmax
        estimate = cfg.estimate_z and cfg.loss == "nce"
        self.register_buffer("z", torch.tensor(-1.0 if estimate else 1.0, dtype=torch.float64))
        self._z_known = not estimate  # caches "z >= 0" so that the check does not read the device every step

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The bank: one unit random vector per training image (uniform then normalised, as VISSL's
        ``norm_init``)."""
        if num_samples < 2:
            raise ValueError("PIRL: the memory bank needs at least 2 images (negatives exclude the image)")
        stdv = 1.0 / math.sqrt(self.cfg.proj_dim / 3)
        bank = torch.rand(num_samples, self.cfg.proj_dim, device=self.head_f.weight.device) * 2 * stdv - stdv
        self.bank = F.normalize(bank, dim=1)

    def forward(self, batch: dict) -> dict:
        if self.bank.shape[0] == 0:
            raise RuntimeError("PIRL: call setup(num_samples, num_classes) to allocate the memory bank first")
        cfg, n = self.cfg, self.bank.shape[0]
        x, x_tiles = batch["views"][:2]  # (N, C, H, W): the image view, the view the tiles are cut from
        index = batch["index"]  # (N,)
        tiles = jigsaw(x_tiles, cfg.grid, cfg.tile_fraction)  # (N, 9, C, t, t), shuffled
        v_tiles = self.backbone(tiles.flatten(0, 1)).unflatten(0, tiles.shape[:2])  # (N, 9, feature_dim)
        g = self.head_g(v_tiles)  # (N, D)
        f = self.head_f(self.backbone(x))  # (N, D)
        with torch.autocast(x.device.type, enabled=False):  # scores and the loss in float32
            g, f = g.float(), f.float()
            negatives = draw_negatives(index, cfg.num_negatives, n)  # (N, N_neg)
            m_pos, m_neg = self.bank[index], self.bank[negatives]  # copies: the update below leaves them intact
            if not self._z_known:
                if self.z < 0:  # the first batch: estimate Z from the jigsaw scores, then keep it fixed
                    self.z.copy_(estimate_z(*scores(g.detach(), m_pos, m_neg), cfg.temperature, n))
                self._z_known = True
            loss, term_g, term_f = pirl_loss(g, f, m_pos, m_neg, cfg.lambd, cfg.temperature, n, self.z,
                                             cfg.loss)
        # after the loss, without gradient, with the global batch so that every rank's bank stays the same
        f_all = F.normalize(concat_all_gather(f.detach()), dim=1)  # m_I moves towards the unit f(v_I)
        update_bank(self.bank, concat_all_gather(index), f_all, cfg.bank_momentum)
        with torch.no_grad():
            pos_f = F.cosine_similarity(f, m_pos).mean()  # f(v_I) against its own bank entry
            pos_g = F.cosine_similarity(g, m_pos).mean()
        return {"loss": loss, "loss_jigsaw": term_g.detach(), "loss_image": term_f.detach(), "pos_sim": pos_f,
                "pos_sim_jigsaw": pos_g}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the whole image (the paper's linear evaluation uses the res5 features)."""
        return self.backbone(x)


MODEL = PIRL


if __name__ == "__main__":
    x = torch.arange(2 * 1 * 9 * 9, dtype=torch.float32).view(2, 1, 9, 9)
    print("tiles of a 9x9 image (first image, shuffled):", jigsaw(x, 3, 2 / 3)[0, :, 0].shape)
    n, bank = 1000, F.normalize(torch.randn(1000, 128), dim=1)
    f, index = F.normalize(torch.randn(8, 128), dim=1), torch.arange(8)
    neg = bank[draw_negatives(index, 64, n)]
    print("random:", pirl_loss(f, f, bank[index], neg, 0.5, 0.07, n)[0].item(),
          "aligned:", pirl_loss(bank[index], bank[index], bank[index], neg, 0.5, 0.07, n)[0].item())
