"""SMoG — Pang, Zhang, Li, Cai, Lu. "Unsupervised Visual Representation Learning by Synchronous Momentum
Grouping". ECCV 2022, arXiv:2207.06167. Catalog id: ``smog``.
Official code: https://bopang1996.github.io/files/SMoG_code.zip (``main_SMoG.py``, ``src/resnet50.py``,
``src/two_stream_network.py``, ``scripts/pretrain/SMoG_ResNet50_400ep_2x224_4x96.sh``; built on SwAV's code).

Contrastive learning between groups instead of instances. An online network (backbone f, projector g,
predictor q) and a momentum target (f, g as an EMA of the online ones) embed different crops of an image;
H heads of K group features c_1..c_K (unit vectors, buffers) partition the embedding sphere. With
z = g(f(x)) / ||.|| and p = q(g(f(x))) / ||.|| for an online crop and z' the target's embedding of a
target crop, the target crop's group is its nearest group feature, a(z') = argmax_k z' . c_k, and each
online prediction is classified against all K groups with that group as the positive:

    L = - 1/(H T V N) sum_{h,t,v,n} log [ exp(p_{v,n} . c^h_a / tau) / sum_k exp(p_{v,n} . c^h_k / tau) ],

with a = a_h(z'_{t,n}) the group of target crop t of image n in head h, over the H heads, the T = 2 target
crops, the V = 2 + M online crops (2 global, M local) and the N images.
Momentum grouping, synchronous with the step (before the loss, which sees the moved groups): the online
embeddings z of the online global crop h mod 2 are assigned to their nearest group and every group that
received some moves towards their mean,

    c_k <- normalise(beta c_k + (1 - beta) mean_{n: a(z_n) = k} z_n),

beta falling linearly from 1.0 to 0.99 over the run (official ``--C_momentum 1.0 --C_momentum_final 0.99
--linear_C_momentum``). The target follows the online network with momentum 0.999. Once per epoch the
groups are re-initialised by a spherical k-means (10 iterations) on a memory of the online global crops'
embeddings of the whole data set (their latest), and the target is reset to the online weights
(official ``cluster_memory``, ``--reset_k_encoder``). The two sets of crops come from BYOL's asymmetric
pair of distributions (T: blur; T': rare blur, solarisation), and the two networks swap sets every step.

Collapse: the loss is a K-way softmax over group features, so the other groups are negatives at the group
level: identical group features cost log K whatever the prediction, and only predictions that separate
the groups lower it. The groups cannot drift together: each epoch they are re-seeded by k-means on the
memory of recent embeddings, empty groups keep their feature, and the slow, periodically reset target
keeps the assignments stable between re-groupings (the paper's motivation: clustering whose supervision
does not lag behind the network).

Distributed: everything the groups depend on is computed from the GLOBAL batch, so the group features
and the memory (buffers) stay identical on every rank. The momentum grouping all-reduces each group's sum
of embeddings and count (official ``M_step``); the memory is written with the embeddings and indices of
the whole batch, gathered; the k-means seeds are drawn on rank 0 and broadcast, and each rank scores a
1/world share of the memory's rows with the sums and counts all-reduced (official distributed k-means).
Each sample's loss uses only its own crops and the shared group features, so DDP's gradient averaging
gives the global batch's loss. BN statistics are shared across GPUs with SyncBatchNorm (the official code
synchronises them over groups of 8 GPUs, ``--syncbn_process_group_size 8``).

Deviations:
- the first groups come from a k-means on the first global batch's online embeddings (random unit
  vectors if K exceeds that batch): the official code first fills the memory with a pass of the
  randomly initialised network over the data set (``init_memory``), which the harness does not offer;
- re-grouping follows a count of samples written to the memory (every ``regroup_epochs`` x n samples of
  the global batch, the remainder carried over) instead of the start of each epoch; with ``drop_last``
  that is within a step of the epoch boundary. The memory is a per-sample bank (each row the sample's
  latest embedding) replicated on every rank, where the official code keeps the last epoch's embeddings
  in loader order, sharded over ranks; rows not yet written are left out of the k-means;
- the group features and the memory are computed in the forward pass and stored in ``on_step_end``, after
  the optimizer step (the loss still sees this step's moved groups, as in the official code);
- the online and target sets of crops swap with the parity of the global step (official: of the
  iteration within the epoch); the target encodes its two global crops only, so its projector's BN
  statistics come from them alone (the official target also encodes local crops, whose assignments the
  loss does not use);
- no gradient flows through the group features: the official code detaches them
  (``MultiPrototypes.forward``), although its README speaks of gradients through them;
- LARS exempts biases and norm parameters from adaptation and weight decay (the harness's groups; the
  official LARC adapts and decays all), the learning rate warms up from 0 (official 0.01) and decays to 0
  (official 0.0048); no gradient accumulation (the official ``multi_forward`` option);
- the Gaussian blur is dropped below 64 px (as SimCLR on CIFAR-10), its kernel is 10% of the side; crops
  are resized bilinearly so that they run batched on the device. A ViT sees local crops with its position
  embeddings resized bicubically (DINO's ``encode``).

Sources: the paper's full text was not accessible here; every value below is from the official code
released by the first author (ResNet-50 script), named with its flag. lightly's reimplementation (its
example resets the groups and the momentum weights every 300 iterations, citing the paper's Table 7b) was
read for comparison; at ImageNet's 312 iterations per epoch that is about once per epoch.

Cost: the memory holds 2 x n x D floats on every rank (1.3 GB for ImageNet at D = 128); a re-grouping
scores 10 x (n / world) x K dot products per rank per head; a step scores H x (2 + M) N x K logits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    num_groups: int = 3000
    """K, group features per head (official ``--nmb_prototypes 3000 3000 3000``)."""
    num_heads: int = 3
    """H, independent groupings of the same embeddings, their losses averaged (the three entries of
    ``--nmb_prototypes``); head h is moved by the online global crop h mod 2 and re-grouped on its memory."""
    temperature: float = 0.1
    """tau of the group softmax (official ``--temperature 0.1``)."""
    proj_hidden_dim: int = 2048
    """Hidden width of projector and predictor (official ``--hidden_mlp 2048``)."""
    proj_dim: int = 128
    """D, the embedding and group-feature dimension (official ``--feat_dim 128``)."""
    group_momentum: float = 1.0
    """beta of the momentum grouping at the start of training (official ``--C_momentum 1.0``)."""
    group_momentum_final: float = 0.99
    """beta at the end, reached linearly per step (official ``--C_momentum_final 0.99
    --linear_C_momentum``)."""
    key_momentum: float = 0.999
    """Constant EMA rate of the target (official ``--K_momentum 0.999``; ``TwoStreamNet.m``)."""
    reset_target: bool = True
    """Copy the online weights into the target at every re-grouping (official ``--reset_k_encoder``)."""
    regroup_epochs: float = 1.0
    """Re-group by k-means on the memory after this many epochs' worth of samples (official: at the start
    of every epoch, ``cluster_memory`` in ``train``)."""
    kmeans_iters: int = 10
    """Iterations of the spherical k-means (official ``cluster_memory(nmb_kmeans_iters=10)``)."""
    n_local_crops: int = 4
    """M, local crops of the online branch: 2 x 224 + 4 x 96 online, 2 x 224 target (official script name,
    ``--crops_for_assign 0 1 --crops_for_q 2 3``, ``--nmb_crops`` default 4 4); M are made per set of crops."""
    global_crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area range of the global crops (official ``--min_scale_crops 0.2 --max_scale_crops 1.0``)."""
    local_crop_scale: tuple[float, float] = (0.05, 0.2)
    """Area range of the local crops (official ``--min_scale_crops 0.05 --max_scale_crops 0.2``)."""
    local_crop_ratio: float = 96 / 224
    """Side of a local crop over a global one (official ``--size_crops 224 96``)."""
    optimizer: str = "lars"
    """SGD (momentum 0.9) wrapped in LARC, trust coefficient 0.001 (official, ResNet)."""
    base_lr: float = 0.3
    """Official ``--base_lr 4.8`` at a global batch of 4096, i.e. 0.3 per 256."""
    weight_decay: float = 1e-6
    """Official ``--wd 1e-6``."""
    momentum: float = 0.9
    """SGD momentum (official code)."""
    warmup_epochs: int = 10
    """Official ``--warmup_epochs 10``, then cosine decay."""
    epochs: int = 400
    """Official ``--epochs 400`` (ResNet-50, README table)."""
    batch_size: int = 4096
    """Global batch (official README table; the script sets 64 per GPU)."""
    sync_batchnorm: bool = True
    """Official ``--sync_bn apex``."""


# CPU runs on the embedded digits (1,437 images of 32 px, batch 64, 15 epochs = 330 steps, small_cnn); k-NN of
# the online backbone from `selfsup train smog --set ...` (random init: 83.9%):
# - num_groups 30: the official 3000 groups for ImageNet's 1,000 classes are 3 per class; 30 for 10 digits,
#   fewer than the first batch (64) so that the first k-means seeds every group from it;
# - n_local_crops 2 per set of crops (16 px): each costs a quarter of a global crop;
# - key_momentum 0.99: with the official 0.999 the target barely moves between the re-groupings (every 22
#   steps here, each resetting it): 85.8%; 0.99: 88.3%;
# - warmup_epochs 1: ten of 15 epochs would be warm-up (the harness caps it at half the run);
# - base_lr 2.0, a peak lr of 0.5 at batch 64 (BYOL's preset for LARS; linear scaling of the official 4.8 at
#   4096 gives 0.075): base_lr 4.0 gave 87.5%;
# - crop scales (0.4, 1) and (0.14, 0.4): smaller crops of an 8x8 digit upscaled to 32 px are blobs (as
#   BYOL's and DINO's presets).
PRESETS = {"small": dict(num_groups=30, n_local_crops=2, key_momentum=0.99, warmup_epochs=1, base_lr=2.0,
                         global_crop_scale=(0.4, 1.0), local_crop_scale=(0.14, 0.4))}


# --- augmentations (official MultiCropDataset with --byolAug) -------------------------------------


# copied from dino.py (keep identical)
def local_crop_size(cfg: Config, image_size: int) -> int:
    """The local crops' side: the 96/224 ratio rounded to a multiple of 8 (96 is one: six ViT-S/16 patches);
    16 px at 32 px, i.e. four 4-px patches, 2x2 after three poolings."""
    return max(8, 8 * round(image_size * cfg.local_crop_ratio / 8))


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """4 + 2M views, each its own v2 pipeline: two global crops from T (always blurred), two from T' (blurred
    with p=0.1, solarised with p=0.2), then M local crops from T and M from T' (official ``--byolAug``:
    jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2 for all). Each takes a PIL image or a uint8
    tensor."""

    def make(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_size >= 64:  # sigma 0.1-2 px (official: PIL radius), kernel 10% of the crop's side
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # on uint8 values, before ToDtype
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    local, m = local_crop_size(cfg, image_size), cfg.n_local_crops
    t = [make(image_size, cfg.global_crop_scale, 1.0, 0.0) for _ in range(2)]
    t_prime = [make(image_size, cfg.global_crop_scale, 0.1, 0.2) for _ in range(2)]
    local_t = [make(local, cfg.local_crop_scale, 1.0, 0.0) for _ in range(m)]
    local_t_prime = [make(local, cfg.local_crop_scale, 0.1, 0.2) for _ in range(m)]
    return t + t_prime + local_t + local_t_prime


# --- backbone on crops of several sizes, and the heads ----------------------------------------------


# copied from dino.py (keep identical)
def encode(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone features (N, D) of x (N, C, H, W). A ViT with fixed position embeddings for another grid
    (``patch_embed`` a strided conv, ``pos_embed`` (L, D) for a square grid, ``cls_token``, ``blocks``,
    ``norm``) gets them resized bicubically to x's patch grid and returns its CLS token."""
    pos = getattr(backbone, "pos_embed", None)
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    if pos is None or stride is None:
        return backbone(x)  # not a ViT
    if pos.shape[0] == (x.shape[-2] // stride[0]) * (x.shape[-1] // stride[1]):
        return backbone(x)  # x at the ViT's own size
    t = backbone.patch_embed(x)  # (N, D, h, w)
    (h, w), d, side = t.shape[-2:], t.shape[1], math.isqrt(pos.shape[0])
    grid = pos.T.reshape(1, d, side, side).float()
    pos = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
    pos = pos.reshape(d, h * w).T  # (h*w, D)
    t = t.flatten(2).transpose(1, 2) + pos.to(t.dtype)  # (N, L_x, D)
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1), t], dim=1)  # (N, 1 + L_x, D)
    for blk in backbone.blocks:
        t = blk(t)
    return backbone.norm(t)[:, 0]  # (N, D)


def encode_views(backbone: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Backbone features (V N, F) of V views, one backbone call per run of views of one resolution."""
    feats, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        feats.append(encode(backbone, torch.cat(list(views[start:end]))))  # (k N, F)
        start = end
    return torch.cat(feats)


def projector(in_dim: int, cfg: Config) -> nn.Module:
    """Linear - BN - ReLU - Linear - BN without affine (official ``src/resnet50.py`` projection_head)."""
    hidden = cfg.proj_hidden_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, cfg.proj_dim), nn.BatchNorm1d(cfg.proj_dim, affine=False))


def predictor(cfg: Config) -> nn.Module:
    """Linear - BN - ReLU - Linear on the projection (official ``predictor_head``, ``--with_predictor``)."""
    hidden = cfg.proj_hidden_dim
    return nn.Sequential(nn.Linear(cfg.proj_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, cfg.proj_dim))


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


def shared_randperm(n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of range(n), rank 0's on every rank."""
    perm = torch.randperm(n, device=device)
    if _world()[0] > 1:
        dist.broadcast(perm, 0)
    return perm


# --- the loss, the grouping and the k-means ----------------------------------------------------------


def smog_loss(p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The group-level contrastive loss averaged over heads, target crops, online crops and the batch.
    p: (V, N, D) unit online predictions; groups: (H, K, D) unit group features (no gradient);
    targets: (H, T, N) the group of each target crop, per head."""
    v, n, _ = p.shape
    total = 0.0
    for h in range(groups.shape[0]):
        logits = p.flatten(0, 1) @ groups[h].detach().T / temperature  # (V N, K)
        log_q = F.log_softmax(logits, dim=-1).view(v, n, -1)  # (V, N, K)
        for t in targets[h]:  # (N,): one target crop's groups, the positive of every online crop
            total = total - log_q.gather(-1, t.expand(v, n).unsqueeze(-1)).mean()
    return total / (targets.shape[0] * targets.shape[1])


@torch.no_grad()
def assign(z: torch.Tensor, groups: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """The nearest group of each embedding: argmax_k z . c_k. z: (N, D); groups: (K, D). Returns (N,)."""
    return torch.cat([(part @ groups.T).argmax(dim=1) for part in z.split(chunk)])


@torch.no_grad()
def group_sums(z: torch.Tensor, assignment: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the sum of its embeddings (K, D) and their count (K,), all-reduced over ranks."""
    sums = torch.zeros(k, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, assignment, z)
    counts = torch.bincount(assignment, minlength=k).to(z.dtype)
    if _world()[0] > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return sums, counts


@torch.no_grad()
def momentum_grouping(groups: torch.Tensor, z: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """c_k <- normalise(beta c_k + (1 - beta) mean of the z assigned to c_k), for every group that received
    one; the others keep their feature (official ``M_step``). groups: (K, D); z: (N, D) unit embeddings of
    this rank. Returns the new (K, D)."""
    sums, counts = group_sums(z, assign(z, groups), groups.shape[0])
    used = (counts > 0).unsqueeze(1)  # (K, 1)
    mean = sums / counts.clamp_min(1).unsqueeze(1)  # (K, D)
    return F.normalize(torch.where(used, beta * groups + (1 - beta) * mean, groups), dim=1)


@torch.no_grad()
def group_kmeans(x: torch.Tensor, init: torch.Tensor, iters: int) -> torch.Tensor:
    """Spherical k-means from the seeds init (K, D): assign each row of x (M, D) (this rank's share) to its
    nearest centre by dot product, move each centre to the normalised mean of its rows (sums all-reduced),
    ``iters`` times; an empty cluster keeps its centre (official ``cluster_memory``)."""
    centres = init.clone()
    for _ in range(iters):
        centres = momentum_grouping(centres, x, 0.0)
    return centres


def group_momentum_at(step: int, total_steps: int, cfg: Config) -> float:
    """beta after ``step`` of ``total_steps`` steps: linear from group_momentum to group_momentum_final."""
    frac = min(1.0, step / max(1, total_steps))
    return cfg.group_momentum + (cfg.group_momentum_final - cfg.group_momentum) * frac


# copied from dino.py (keep identical)
@torch.no_grad()
def ema_update_parameters(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- lambda theta_t + (1 - lambda) theta_s, parameters only (official code): the teacher's BN
    statistics are its own, from its forward passes on the global crops; the student's also come from the
    local crops, at another resolution."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - momentum)


# --- model --------------------------------------------------------------------------------------------


class SMoG(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.online = nn.Sequential(backbone, projector(feature_dim, cfg))  # f, g
        self.predictor = predictor(cfg)  # q
        self.target = copy.deepcopy(self.online).requires_grad_(False)  # same initial weights, no predictor
        h, k, d = cfg.num_heads, cfg.num_groups, cfg.proj_dim
        self.register_buffer("groups", F.normalize(torch.randn(h, k, d), dim=-1))  # (H, K, D), set at step 0
        self.register_buffer("groups_ready", torch.tensor(False))
        self.register_buffer("memory", torch.zeros(2, 0, d))  # (2, n, D), sized in setup()
        self.register_buffer("filled", torch.zeros(0, dtype=torch.bool))  # (n,) rows written at least once
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # samples written since re-grouping
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # finished steps: the swap
        self.register_buffer("beta", torch.tensor(float(cfg.group_momentum)))  # the next step's beta
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # stored in on_step_end
        self._ready = False  # caches groups_ready, so that the check does not read the device every step

    @property
    def backbone(self) -> nn.Module:
        return self.online[0]

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The memory of the online global crops' embeddings, one row per training image and crop."""
        if num_samples < self.cfg.num_groups:
            raise ValueError(f"SMoG: num_groups={self.cfg.num_groups} exceeds the {num_samples} training "
                             "samples")
        self.memory = torch.zeros(2, num_samples, self.cfg.proj_dim, device=self.groups.device)
        self.filled = torch.zeros(num_samples, dtype=torch.bool, device=self.groups.device)

    @torch.no_grad()
    def first_groups(self, z_all: torch.Tensor) -> torch.Tensor:
        """Head h: k-means on the global batch's online embeddings of global crop h mod 2, seeded with K of
        them (random unit vectors when the batch has fewer than K). z_all: (2, N_global, D)."""
        world, rank = _world()
        k, out = self.cfg.num_groups, []
        for h in range(self.cfg.num_heads):
            x = z_all[h % 2]  # (N_global, D)
            if len(x) < k:
                out.append(self.groups[h])
                continue
            seeds = x[shared_randperm(len(x), x.device)[:k]]
            out.append(group_kmeans(x.chunk(world)[rank], seeds, self.cfg.kmeans_iters))
        return torch.stack(out)

    def forward(self, batch: dict) -> dict:
        cfg, views = self.cfg, batch["views"]
        m = cfg.n_local_crops
        if len(views) != 4 + 2 * m:
            raise ValueError(f"SMoG expects 4 + 2 x {m} views (augmentations()), got {len(views)}")
        if self.memory.shape[1] == 0:
            raise RuntimeError("SMoG: call setup(num_samples, num_classes) to allocate the memory first")
        set_t = list(views[0:2]) + list(views[4 : 4 + m])  # T: 2 global, M local
        set_t_prime = list(views[2:4]) + list(views[4 + m :])  # T'
        online_views, target_views = (set_t_prime, set_t) if int(self.iteration) % 2 else (set_t, set_t_prime)
        n, v = len(views[0]), 2 + m

        proj = self.online[1](encode_views(self.online[0], online_views))  # (V N, D), one BN batch
        pred = self.predictor(proj)  # (V N, D)
        with torch.no_grad():
            z_t = self.target(torch.cat(target_views[:2]))  # (2 N, D): the target's two global crops
        with torch.autocast(proj.device.type, enabled=False):  # groups, assignments and the loss in float32
            p = F.normalize(pred.float(), dim=-1).view(v, n, -1)  # (V, N, D)
            with torch.no_grad():
                z = F.normalize(proj.detach().float()[: 2 * n], dim=-1).view(2, n, -1)  # online globals
                z_t = F.normalize(z_t.float(), dim=-1).view(2, n, -1)  # (2, N, D)
                z_all = torch.stack([concat_all_gather(z[0]), concat_all_gather(z[1])])  # (2, N_global, D)
                self._ready = self._ready or bool(self.groups_ready)
                old = self.groups if self._ready else self.first_groups(z_all)  # (H, K, D)
                targets = torch.stack([torch.stack([assign(z_t[t], old[h]) for t in range(2)])
                                       for h in range(cfg.num_heads)])  # (H, 2, N), the old groups
                groups = torch.stack([momentum_grouping(old[h], z[h % 2], self.beta)
                                      for h in range(cfg.num_heads)])  # (H, K, D), synchronous
            loss = smog_loss(p, groups, targets, cfg.temperature)
            with torch.no_grad():
                pos_sim = (z_t[0] * old[0][targets[0, 0]]).sum(-1).mean()  # target crop vs its group
        self.pending = (groups, z_all, concat_all_gather(batch["index"].to(z.device)))
        used = (torch.bincount(targets[0].flatten(), minlength=cfg.num_groups) > 0).float().mean()  # head 0
        return {"loss": loss, "group_sim": pos_sim, "groups_used": used, "beta": self.beta.clone()}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the target follows the online network, this step's group features and
        embeddings are stored, and after an epoch's worth of samples the groups are re-made by k-means on the
        memory and the target is reset. ``step`` counts finished steps."""
        cfg = self.cfg
        ema_update_parameters(self.target, self.online, cfg.key_momentum)
        self.iteration.fill_(step)
        self.beta.fill_(group_momentum_at(step, total_steps, cfg))
        if self.pending is None:
            return
        groups, z_all, index = self.pending
        self.pending = None
        self.groups.copy_(groups)
        self.groups_ready.fill_(True)
        self.memory[:, index] = z_all.to(self.memory.dtype)  # (2, N_global, D) at the batch's rows
        self.filled[index] = True
        self.seen += len(index)
        period = max(1, round(cfg.regroup_epochs * self.memory.shape[1]))
        if int(self.seen) >= period:
            self.seen -= period
            self.regroup()

    @torch.no_grad()
    def regroup(self) -> None:
        """k-means on the memory (head h on crop h mod 2's rows), seeded with K rows drawn on rank 0, each
        rank scoring a 1/world share; then the target is reset to the online weights."""
        world, rank = _world()
        rows = self.filled.nonzero().squeeze(1)  # (n_filled,)
        if len(rows) >= self.cfg.num_groups:
            for h in range(self.cfg.num_heads):
                x = self.memory[h % 2]  # (n, D)
                seeds = x[rows[shared_randperm(len(rows), rows.device)[: self.cfg.num_groups]]]
                self.groups[h] = group_kmeans(x[rows[rank::world]], seeds, self.cfg.kmeans_iters)
        if self.cfg.reset_target:
            for t, o in zip(self.target.parameters(), self.online.parameters()):
                t.copy_(o)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The online backbone's features (the official linear evaluation loads the online encoder)."""
        return encode(self.backbone, x)


MODEL = SMoG


if __name__ == "__main__":
    p = F.normalize(torch.randn(3, 8, 16), dim=-1)
    groups = F.normalize(torch.randn(2, 10, 16), dim=-1)
    targets = torch.randint(10, (2, 2, 8))
    flat = F.normalize(torch.ones(2, 10, 16), dim=-1)  # coinciding group features: log K
    print("random:", smog_loss(p, groups, targets, 0.1).item(),
          "collapsed groups:", smog_loss(p, flat, targets, 0.1).item())
