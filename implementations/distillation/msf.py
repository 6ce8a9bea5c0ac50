"""MSF — Koohpayegani, Tejankar, Pirsiavash. "Mean Shift for Self-Supervised Learning". ICCV 2021,
arXiv:2105.07269. Catalog id: ``mean-shift``. Official code: https://github.com/UMBCvision/MSF
(``train_msf.py``, class ``MeanShift``).

BYOL with a neighbourhood instead of one positive. An online network (encoder f, projector g, predictor
q) embeds one view into the query u = q(g(f(x))); a target network (f_xi, g_xi), an exponential moving
average of (f, g), embeds another view into v = g_xi(f_xi(x')). A FIFO memory bank holds the normalised
target embeddings of recent batches. The current batch's targets are written to the bank first, then
each target's k nearest neighbours NN(v, k) are looked up there, so that v itself is always the first of
them (the paper's Fig. 1), and the query is pulled towards all of them:

    L = 1/k sum_{z in NN(v, k)} || u / ||u|| - z / ||z|| ||^2 = 1/k sum_z (2 - 2 cos(u, z)),

averaged over the batch (the official code divides by k; the paper writes the sum). Because
sum_z ||u - z||^2 = k ||u - z_mean||^2 + const, minimising it moves u towards the mean of the k
neighbours: one mean-shift step in embedding space. The neighbours are picked with the target v, not
the query u, and with k = 1 the loss is BYOL's without its symmetrisation (abstract: "identical to
BYOL"). The target gets no gradient; after every step xi <- m xi + (1 - m) theta with a constant
m = 0.99 (official ``--momentum``, no schedule).

Views: the target sees a weak view (crop and flip), the online network a strong one (MoCo v2's colour
jitter, grayscale and blur on top): the official ``--augmentation weak/strong``, its default since the
August 2021 code. ``augmentation`` takes the code's other settings too: ``weak/weak`` is the "weak
augmentations only" setting that the abstract highlights, ``strong/strong`` the code's default before
that release (March 2021, where ``--weak_strong`` opted in). The paper's other variant, "MSF w/s" (the
project page: slightly better than MSF), has no preset here.

Collapse: no negatives, and nothing of MSF's own prevents it; a constant embedding would make every
neighbour equal to the target and the loss 0. The BYOL asymmetry does: a predictor on the online branch
only, and a target that takes no gradient and follows the online network slowly (with k = 1 the method
is one-sided BYOL). Keeping v itself among its neighbours keeps the per-image term of BYOL in the loss.

Distributed: the bank must be identical on every rank. Each rank encodes its shard of the target views;
the normalised targets of the GLOBAL batch are all-gathered without gradient and written to the bank in
rank order on every rank, before the search, as one process writes the whole batch. Each query's loss
needs only its own target and the bank, so the mean over equal shards is the loss of the global batch,
and DDP's gradient averaging does the rest. BN statistics are per process (``sync_batchnorm = False``):
the official code trains with DataParallel, whose BN normalises each GPU's sub-batch.

Deviations:
- the official code also permutes the target batch before its DataParallel encoder splits it over the
  GPUs (MoCo's shuffling BN); that is not done here: in one process a permutation changes nothing, and
  under DDP each rank encodes its own shard, as in BYOL;
- the EMA update runs in ``on_step_end``, after the optimizer step; the official code runs it at the
  start of the next forward, which gives the same sequence of target weights;
- the target's BN running statistics are copied from the online network (``ema_update``, shared with
  byol.py); the official code leaves the target's own. Neither is used in training, where the target
  normalises with batch statistics, nor in evaluation (``embed`` uses the online backbone);
- the loss is the mean over the k neighbours (official code), not the paper's sum: the same direction,
  1/k of its gradient, the scale for which the official learning rate was set;
- no "purity" diagnostic (the share of neighbours with the query's class): it needs labels;
- the bank's size need not divide by the batch size (the official code asserts it); writes wrap around;
- the Gaussian blur takes a kernel of 10% of the side (the official code blurs with PIL by radius sigma)
  and is dropped below 64 px (as SimCLR does for CIFAR-10); the flip comes right after the crop instead
  of last, which commutes with the per-pixel colour operations, so the views can be made batched on the
  device;
- biases and norm parameters get no weight decay (the harness's optimizer groups); the official code
  decays every parameter. The cosine schedule runs per step, not per epoch.

Cost: the search scores each query's target against the whole bank, an (N, M) matrix (256 x 1.024M, as
in the official code).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

AUGMENTATIONS = ("weak/strong", "weak/weak", "strong/weak", "strong/strong")  # target/online


@dataclass(frozen=True)
class Config:
    topk: int = 5
    """k, the neighbours of the target in the bank, the target itself included (abstract: "5 used in our
    experiments"; official ``--topk`` default 5; the README's command uses 10 with a 128,000 bank)."""
    bank_size: int = 1_024_000
    """Entries in the FIFO memory bank (official run_msf.sh ``--mem_bank_size 1024000``; the flag's
    default and the README's command use 128,000, which the README says fits 4 GPUs of 11 GB)."""
    target_momentum: float = 0.99
    """m in xi <- m xi + (1 - m) theta, constant (official ``--momentum 0.99``, README and run_msf.sh)."""
    proj_hidden_dim: int = 4096
    """Hidden width of projector and predictor, Linear-BN-ReLU-Linear: twice ResNet-50's 2048 (official
    ``get_mlp``, ``hidden_dim = feat_dim * 2``)."""
    proj_dim: int = 512
    """Output of projector and predictor, the bank's width: a quarter of ResNet-50's 2048 (official
    ``proj_dim = feat_dim // 4``)."""
    augmentation: str = "weak/strong"
    """Target/online view recipes (official ``--augmentation``, default ``weak/strong``): weak is crop and
    flip, strong adds MoCo v2's colour jitter, grayscale and blur."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop, both views (official ``get_train_loader``)."""
    optimizer: str = "sgd"
    """SGD (official ``train_msf.py``)."""
    base_lr: float = 0.05
    """lr 0.05 at batch 256 (official README and run_msf.sh ``--learning_rate 0.05``), cosine (``--cos``)."""
    weight_decay: float = 1e-4
    """Official ``--weight_decay`` default."""
    momentum: float = 0.9
    """SGD momentum (official ``--sgd_momentum`` default)."""
    warmup_epochs: int = 0
    """No warm-up: the cosine starts at the peak rate (official ``util.adjust_learning_rate``)."""
    epochs: int = 200
    """Abstract ("ResNet50 at 200 epochs"); official README and run_msf.sh ``--epochs 200``."""
    batch_size: int = 256
    """Official ``--batch_size`` default (one DataParallel process on 4 GPUs, README)."""
    sync_batchnorm: bool = False
    """BN statistics per GPU, as DataParallel computes them in the official code."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64;
# k-NN of the online backbone from `selfsup train mean-shift --set ...` runs, random init 0.839):
# - bank_size 1024: 16 of the 22 batches of an epoch, as 1.024M is 80% of ImageNet's 1.28M, so that a target
#   finds its own image's embedding of the epoch before in the bank about as often (r^2 / 2 for a bank of
#   r epochs: 26% here, 32% on ImageNet); it turns over about 20 times in 330 steps;
# - proj_hidden_dim 512, proj_dim 64: the official rule (twice and a quarter of the backbone's width) on
#   the small CNN's 256-d features; the paper's 4096/512 heads give 0.825 at 1.6 times the step time;
# - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets).
# The rest is the paper's (topk 5, target_momentum 0.99, SGD at base_lr 0.05): k-NN 0.839, linear 0.975,
# level with random init, not above it. Tried: base_lr 0.2, 0.792 (the target embeddings crowd: mean cosine
# to the 4 nearest 0.97, against 0.74 at init); topk 2, 0.825; target_momentum 0.996, 0.839; BYOL's preset
# optimizer (LARS, base_lr 2.0, 10 warm-up epochs), 0.828; topk 1 (BYOL's one-sided loss on these views),
# 0.844. Then (settings -> k-NN, linear): augmentation strong/strong (colour on the target too) -> 0.808,
# 0.992; base_lr 0.1 with min_scale 0.6 -> 0.789, 0.986 (pos_sim 0.87 at the end: it aligns, and k-NN
# falls); augmentation weak/weak (the abstract's "weak augmentations only") -> 0.731, 0.983. Every
# change that lets the network move further (a higher rate, easier or more similar views) lowers k-NN;
# fewer neighbours (topk 1) is the only one above 0.839. A bank larger than the data set, so that every
# target finds its own image's embedding of the epoch before: bank_size 2048 -> 0.839, 0.986; bank_size
# 4096 with topk 2 -> 0.819, 0.989. Still NOT above the baseline: the preset is left
# as it was. One test image is 0.28%: MSF learns here about as little as the one-sided BYOL does in 330
# steps, and pulling each query to 5 bank neighbours of an 84%-pure k-NN space seems to merge classes.
PRESETS = {"small": dict(bank_size=1024, proj_hidden_dim=512, proj_dim=64, min_scale=0.4)}


# --- augmentations (official get_train_loader: weak and strong) ------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """[online view, target view], the official order (query, target). Weak: crop (scale 0.2-1) and flip;
    strong: crop, flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, blur p=0.5
    (official get_train_loader; the flip moved forward, see Deviations). Each view is one v2 pipeline;
    it takes a PIL image or a uint8 tensor."""
    if cfg.augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation {cfg.augmentation!r}: one of {', '.join(AUGMENTATIONS)} (target/online)")

    def make(strong: bool) -> v2.Compose:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if strong:
            steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
            if image_size >= 64:
                kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd
                steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    target, online = cfg.augmentation.split("/")
    return [make(online == "strong"), make(target == "strong")]


# --- heads ----------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear - BN - ReLU - Linear (official ``get_mlp``), used for the projector and the predictor."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


# --- loss, bank and target ------------------------------------------------------------------------


@torch.no_grad()
def nearest_neighbours(target: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices (N, k) of the k bank rows nearest to each target, nearest first. target: (N, D); bank:
    (M, D) with unit rows. Between unit vectors the squared distance is 2 - 2 cos, so the largest cosine
    is the nearest. The scores are computed in the bank's precision even under autocast: in bfloat16
    (8 bits of mantissa) the target's own entry would tie with neighbours closer than cos ~0.996."""
    with torch.autocast(target.device.type, enabled=False):
        sim = F.normalize(target, dim=1).to(bank.dtype) @ bank.T  # (N, M)
    return sim.topk(topk, dim=1).indices  # (N, k)


def msf_loss(query: torch.Tensor, target: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """The mean over the batch and over NN(v, k) of || u/||u|| - z ||^2 = 2 - 2 cos(u, z). query: (N, D)
    online predictions u; target: (N, D) target embeddings v, which pick the neighbours; bank: (M, D) unit
    rows, holding the targets themselves when v is to be its own first neighbour. No gradient flows into
    target or bank."""
    u = F.normalize(query, dim=1)  # (N, D)
    index = nearest_neighbours(target.detach(), bank.detach(), topk)  # (N, k)
    neighbours = bank.detach()[index]  # (N, k, D)
    dist = 2 - 2 * torch.einsum("nd,nkd->nk", u, neighbours.to(u.dtype))  # (N, k) squared distances
    return dist.mean()


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Dequeue and enqueue (MoCo v1 Sec. 3.2), in place: keys (N_global, D) overwrite the oldest entries of
    queue (K, D), from ptr (a 0-d long tensor) on, wrapping around its end; ptr moves past them."""
    size = queue.shape[0]
    keys = keys[-size:]  # more keys than slots: the newest K
    slots = (ptr + torch.arange(len(keys), device=queue.device)) % size  # (N_global,)
    queue[slots] = keys.to(queue.dtype)
    ptr.copy_((ptr + len(keys)) % size)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# --- model ----------------------------------------------------------------------------------------


class MSF(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation {cfg.augmentation!r}: one of {', '.join(AUGMENTATIONS)} (target/online)")
        if not 1 <= cfg.topk <= cfg.bank_size:
            raise ValueError(f"topk {cfg.topk}: between 1 and bank_size ({cfg.bank_size})")
        self.cfg = cfg
        self.online = nn.Sequential(backbone, mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim))
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.target = copy.deepcopy(self.online).requires_grad_(False)  # same initial weights
        # random unit vectors to start with (official code); buffers, so checkpoints carry them
        self.register_buffer("bank", F.normalize(torch.randn(cfg.bank_size, cfg.proj_dim), dim=1))  # (M, D)
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.online[0]

    def forward(self, batch: dict) -> dict:
        x_online, x_target = batch["views"][:2]  # (N, C, H, W) each: strong and weak by default
        u = self.predictor(self.online(x_online))  # (N, proj_dim)
        with torch.no_grad():
            v = F.normalize(self.target(x_target).float(), dim=1)  # (N, proj_dim), no gradient
            v_all = concat_all_gather(v)  # (N_global, proj_dim), rank order
            if len(v_all) > self.cfg.bank_size:
                raise ValueError(f"bank_size {self.cfg.bank_size} is below the global batch ({len(v_all)})")
            enqueue(self.bank, self.bank_ptr, v_all)  # before the search: v is its own first neighbour
        loss = msf_loss(u, v, self.bank, self.cfg.topk)
        with torch.no_grad():
            pos_sim = F.cosine_similarity(u.float(), v).mean()  # the BYOL term, k = 1
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the target follows the online network with a constant momentum.
        A loop of one's own must call this after every step."""
        ema_update(self.target, self.online, self.cfg.target_momentum)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The online backbone's pooled features, without projector and predictor: the official
        eval_knn.py loads the ``encoder_q`` (online) weights and drops the ``fc`` head."""
        return self.backbone(x)


MODEL = MSF


if __name__ == "__main__":
    bank = F.normalize(torch.randn(1024, 64), dim=1)
    v = bank[:8]  # targets already in the bank
    print("random query:", msf_loss(torch.randn(8, 64), v, bank, 5).item(), "query = target:", msf_loss(v, v, bank, 5).item())
