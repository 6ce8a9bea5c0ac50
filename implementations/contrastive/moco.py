"""MoCo v2 and v1 — Chen, Fan, Girshick, He. "Improved Baselines with Momentum Contrastive Learning".
arXiv preprint 2020, arXiv:2003.04297; He, Fan, Wu, Xie, Girshick. "Momentum Contrast for Unsupervised
Visual Representation Learning". CVPR 2020, arXiv:1911.05722. Catalog id: ``moco-v2``. MoCo v1 (catalog
id ``moco``) is this file with ``PRESETS["v1"]`` (``--preset v1``): linear head, tau = 0.07, v1's views.

A query encoder f_q (backbone + head) embeds one view into q; a key encoder f_k, a momentum copy of f_q,
embeds the other view into the positive key k+. With q and keys L2-normalised, InfoNCE (v1 Eq. 1) is

    L_q = -log  exp(q . k+ / tau) / ( exp(q . k+ / tau) + sum_{i=1}^{K} exp(q . k_i / tau) ),

a (K+1)-way softmax with the positive in column 0, where k_1..k_K are the keys of earlier batches in a
FIFO queue (Sec. 3.2). f_k receives no gradient; after every optimizer step
theta_k <- m theta_k + (1 - m) theta_q (Eq. 2), and the current batch's keys replace the oldest ones.
v2 replaces v1's linear 128-D head with a 2-layer MLP, sets tau = 0.2, adds blur and a cosine schedule.

Collapse: the K queued keys are negatives in the denominator, so a constant embedding has loss log(K + 1);
the slowly moving key encoder keeps the queued keys consistent with the current one (v1 Sec. 3.2, 4.1).

Distributed: the loss is per query against a queue that is the same on every rank (keys are gathered
over ranks, without gradient, before they are enqueued), so DDP's gradient averaging gives the loss on
the global batch. Shuffling BN (v1 Sec. 3.3), which stops a query and its key from sharing BN batch
statistics: the key batch is permuted over the global batch (one permutation, broadcast from rank 0),
each rank encodes a random shard with its own BN statistics, and the keys are gathered back into batch
order. BN statistics stay per rank (``sync_batchnorm = False``): global statistics would again be shared
by a query and its key. In one process a permutation does not change BN's output, so ``bn_splits > 1``
encodes queries and shuffled keys in that many BN sub-batches, as several GPUs would (the official CIFAR
demo's SplitBatchNorm does the same).

Deviations: the queue and the key encoder are updated in ``on_step_end``, after the optimizer step, not
in the forward pass (the same order of updates as Algorithm 1: the next forward sees the new queue and
encoder). The Gaussian blur is dropped below 64 px, as SimCLR does for CIFAR-10 (its App. B.9). The views
apply the flip before the colour ops (v1's official code: grayscale, jitter, flip), which gives the same
distribution up to clipping. v1 dropped the learning rate 10x at epochs 120 and 160 (Sec. 4); the
harness has warm-up + cosine only, so ``v1`` uses v2's cosine schedule. The harness exempts biases and
norm parameters from weight decay; the official code decays all parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    temperature: float = 0.2
    """Softmax temperature tau: 0.2, the best with the MLP head (v2, "MLP head"); 0.07 in v1 (Sec. 3.3)."""
    queue_size: int = 65536
    """K, the number of queued negative keys (v1 Sec. 4.1, Fig. 3, Table 1; kept in v2, "Settings")."""
    key_momentum: float = 0.999
    """m of the key encoder's update, Eq. 2 (v1 Sec. 4.1, momentum ablation)."""
    mlp: bool = True
    """v2's 2-layer MLP head (v2, "MLP head"); False: v1's linear fc to proj_dim (v1 Sec. 3.3)."""
    proj_hidden_dim: int = 2048
    """Hidden width of the MLP head, with ReLU (v2, "MLP head": 2048-d)."""
    proj_dim: int = 128
    """Dimension of q and k (v1 Sec. 3.3: 128-D, L2-normalised)."""
    aug_plus: bool = True
    """v2's views (v2, "Augmentation"; Table 1's aug+): jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, blur with
    p=0.5; False: v1's, jitter (0.4, 0.4, 0.4, 0.4) on every image, no blur (v1 Sec. 3.3, official code)."""
    min_scale: float = 0.2
    """Smallest area fraction of the random resized crop, in v1 and v2 (official main_moco.py)."""
    bn_splits: int = 1
    """BN sub-batches per process for shuffling BN: 1 on 8 GPUs of 32 images (v1 Sec. 3.3, 4);
    8 simulates them on one GPU (official CIFAR demo)."""
    optimizer: str = "sgd"
    """SGD (v1 Sec. 4, 'Training')."""
    base_lr: float = 0.03
    """lr 0.03 at batch 256 (v1 Sec. 4; v2, "Settings"); the harness scales it by batch/256."""
    weight_decay: float = 1e-4
    """v1 Sec. 4."""
    momentum: float = 0.9
    """SGD momentum (v1 Sec. 4)."""
    warmup_epochs: int = 0
    """No warm-up: cosine decay from the start (v2 Table 1, 'cos'; official main_moco.py)."""
    epochs: int = 200
    """v1 Sec. 4; v2 Table 1 (800 in Table 2)."""
    batch_size: int = 256
    """On 8 GPUs (v1 Sec. 4; v2, "Settings")."""
    sync_batchnorm: bool = False
    """Per-GPU BN with shuffling (v1 Sec. 3.3), not global statistics."""


PRESETS = {
    # MoCo v1 (catalog id ``moco``): linear head, tau 0.07, v1's views (v1 Sec. 3.3, 4).
    "v1": dict(mlp=False, temperature=0.07, aug_plus=False),
    # CPU runs on the embedded digits (batch 64, 15 epochs = 330 steps, 1,437 images of 32 px):
    # - queue_size 1024: 16 batches, below the 1,437 training images, so the queue rarely holds an older
    #   key of the query's own image as a negative; it turns over about 20 times in 330 steps (the
    #   official CIFAR demo finds the gain saturated at 4096 for 50,000 images);
    # - key_momentum 0.99: with 0.999 the key encoder would move only 28% of the way to the query
    #   encoder in 330 steps (the CIFAR demo uses 0.99);
    # - bn_splits 2: BN sub-batches of 32 images, the paper's per-GPU batch, with shuffling in one process;
    # - min_scale 0.4: 20% crops of an 8x8 digit upscaled to 32 px leave a blob (as in SimCLR's preset).
    "small": dict(queue_size=1024, key_momentum=0.99, bn_splits=2, min_scale=0.4),
}


# --- augmentations (v1 Sec. 3.3; v2, "Augmentation") ----------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """The query and the key view, both from one distribution: crop, flip, colour jitter, grayscale
    (p=0.2), and in v2 blur (p=0.5). Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""
    jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1 if cfg.aug_plus else 0.4)
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([jitter], p=0.8) if cfg.aug_plus else jitter,  # v1 jitters every image
        v2.RandomGrayscale(p=0.2),
    ]
    if cfg.aug_plus and image_size >= 64:
        kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd (SimCLR App. A)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads ----------------------------------------------------------------------------------------


def head(in_dim: int, cfg: Config) -> nn.Module:
    """v2: Linear - ReLU - Linear (v2, "MLP head"; no BN, as in the official code); v1: one Linear."""
    if not cfg.mlp:
        return nn.Linear(in_dim, cfg.proj_dim)
    hidden = cfg.proj_hidden_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cfg.proj_dim))


# --- loss, queue and key encoder ------------------------------------------------------------------


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (v1 Eq. 1) averaged over the N queries. q: (N, D) queries; k: (N, D) positive keys;
    queue: (K, D) negative keys. All are L2-normalised here; no gradient flows into k or the queue."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    negatives = F.normalize(queue.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ negatives.T  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)  # Eq. 1


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


def encode_in_groups(encoder: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """encoder on ``groups`` sub-batches of x, so that BN normalises each one with its own statistics,
    as one of several GPUs would; one call when groups is 1."""
    if groups <= 1:
        return encoder(x)
    return torch.cat([encoder(chunk) for chunk in x.chunk(groups)])


@torch.no_grad()
def shuffled_keys(encoder_k: nn.Module, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffling BN (v1 Sec. 3.3): encode the key views x (N, C, H, W) of a permutation of the global
    batch, so that no key shares BN statistics with its query. Returns the L2-normalised keys in batch
    order: (this rank's (N, D), every rank's (N_global, D))."""
    x_all = concat_all_gather(x)  # (N_global, C, H, W)
    perm = torch.randperm(len(x_all), device=x.device)
    rank = 0
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(perm, 0)  # one permutation on every rank
        rank = dist.get_rank()
    n = len(x)
    mine = perm[rank * n : (rank + 1) * n]  # the samples this rank encodes
    k = F.normalize(encode_in_groups(encoder_k, x_all[mine], groups).float(), dim=1)  # (N, D)
    k_all = concat_all_gather(k)[torch.argsort(perm)]  # (N_global, D), unshuffled
    return k_all[rank * n : (rank + 1) * n], k_all


# --- model ----------------------------------------------------------------------------------------


class MoCo(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.encoder_q = nn.Sequential(backbone, head(feature_dim, cfg))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # same initial weights
        # random unit keys to start with (official code); buffers, so checkpoints carry them
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.pending_keys: torch.Tensor | None = None  # this step's global keys, enqueued in on_step_end

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q[0]

    def forward(self, batch: dict) -> dict:
        x_q, x_k = batch["views"][:2]  # (N, C, H, W) each
        q = encode_in_groups(self.encoder_q, x_q, self.cfg.bn_splits)  # (N, proj_dim)
        k, k_all = shuffled_keys(self.encoder_k, x_k, self.cfg.bn_splits)  # (N, proj_dim), (N_global, ...)
        loss = moco_loss(q, k, self.queue, self.cfg.temperature)
        self.pending_keys = k_all
        with torch.no_grad():
            pos_sim = F.cosine_similarity(q, k).mean()
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the key encoder follows the query encoder (Eq. 2), and the keys of
        the batch just used are enqueued. A loop of one's own must call this after every step."""
        ema_update(self.encoder_k, self.encoder_q, self.cfg.key_momentum)
        if self.pending_keys is not None:
            enqueue(self.queue, self.queue_ptr, self.pending_keys)
            self.pending_keys = None

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The query encoder's pooled features (the head is dropped for linear evaluation, v1 Sec. 4.1)."""
        return self.backbone(x)


MODEL = MoCo


if __name__ == "__main__":
    q, queue = torch.randn(8, 128), F.normalize(torch.randn(4096, 128), dim=1)
    k = torch.randn(8, 128)
    print("random:", moco_loss(q, k, queue, 0.2).item(), "aligned:", moco_loss(q, q, queue, 0.2).item())
