"""SimCLR v2 — Chen, Kornblith, Swersky, Norouzi, Hinton. "Big Self-Supervised Models are Strong
Semi-Supervised Learners". NeurIPS 2020, arXiv:2006.10029. Catalog id: ``simclr-v2``. Official code:
google-research/simclr (tf2/).

The pretraining step of SimCLR v2 (Sec. 2): SimCLR with a deeper projection head and a MoCo-style memory.
Two views of each of N images give 2N projections z = g(f(x)). Without memory it is SimCLR's NT-Xent
(SimCLR Eq. 1), with the other 2N - 1 online projections as the contrasted examples z_k. With memory, the
contrasted examples are the outputs of a memory network (a momentum copy of f and g, whose weights follow
the online ones by an EMA) on the current and on earlier batches: for anchor z_i with positive pair (i, j),

    l(i, j) = -log  exp(sim(z_i, k_j) / t) / ( sum_{c != i} exp(sim(z_i, k_c) / t) + sum_{q=1..K} exp(sim(z_i, m_q) / t) ),

where k_c are the memory network's projections of the batch's 2N views (c != i leaves out the anchor's own
view), m_q the K keys of earlier batches in a FIFO queue; the loss averages l over the 2N anchors and flows
only through z.

Head: g has 3 layers (Sec. 2), Linear - BN - ReLU twice, then Linear - BN; every middle layer is as
wide as its input and the last maps to 128 (official ``--num_proj_layers 3``, ``--proj_out_dim 128``;
ProjectionHead in tf2/model.py, whose last BN has no shift). The paper fine-tunes from the first layer of
g instead of discarding it (Sec. 2; README: ``--ft_proj_selector=1``): ``embed_layer`` picks the
representation, 0 for the backbone output h, j for the output of g's j-th layer; it is 1 by default.
Linear evaluation in the official code reads ``--ft_proj_selector``, 0 by default: the backbone output
(the README's linear-eval example trains on ``final_avg_pool``). The harness's k-NN and linear probe
read ``embed``, so ``--set embed_layer=0`` evaluates as the official linear evaluation does. Both views
go through the network in one batch, as the official Model concatenates them (BN statistics over 2N).

Memory (Sec. 2: ~1% better linear evaluation at batch 4096; Sec. 3.1: 64K entries, EMA decay 0.999). The
paper gives no equation, and the released code has no memory (google-research/simclr issue #54). By the
first author's account (issue #115) it follows MoCo: the examples an anchor is contrasted with come from
the momentum encoder, for the current and past batches. This file reads that as the loss above: the memory
network embeds both views without gradient, its keys of the current batch are the positives and in-batch
negatives, and after the optimizer step they replace the oldest queue entries. ``queue_size = 0`` turns the memory off
(no memory network is built; SimCLR's loss). The queue starts as random unit vectors (as MoCo's official
code). Cost: one more forward pass (no backward) per step.

Collapse: the 2(N-1) other images' projections (or keys) of the batch and the K memory entries are
negatives, so a constant embedding has loss log(2N - 1 + K), the maximum at a given temperature.

Distributed: negatives come from the global batch. Without memory the projections are all-gathered with
gradient (``gather_with_grad``); with memory the memory network's keys are all-gathered per view without
gradient (``concat_all_gather``), used as the global batch's keys and then enqueued, so the queue holds
the global batch in the same order, identical on every rank; the memory network follows the DDP-averaged
weights, so it stays identical too. Each rank scores its own anchors, and the mean over ranks equals the
one-process loss on the concatenated batch.

Deviations:
- the Gaussian blur is dropped below 64 px, as SimCLR does for CIFAR-10 (its App. B.9);
- learning-rate scaling: the paper's peak rate is 0.1 sqrt(batch) (6.4 at batch 4096); the harness scales
  ``base_lr`` linearly, and base_lr 0.4 gives the same 6.4 at the paper's batch of 4096 only;
- the memory (see Memory) is this file's reading of the paper and the authors' comment: which views are
  keyed and enqueued (both) and that the anchor's own-view key is left out are not stated anywhere; the
  queue and the memory network are updated in ``on_step_end``, after the optimizer step (the same order
  as MoCo's Algorithm 1);
- the frozen shift of the last BN is a zero bias with ``requires_grad`` off (TF's ``center=False``).
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
    temperature: float = 0.1
    """NT-Xent temperature t (official ``--temperature 0.1``, the README's ImageNet pretraining command)."""
    num_proj_layers: int = 3
    """Layers of the projection head g: 3 (Sec. 2; official ``--num_proj_layers 3``)."""
    proj_hidden_dim: int = 0
    """Width of g's middle layers; 0: as wide as the backbone's features (2048 for ResNet-50), as the
    official ProjectionHead makes them (``int(input_shape[-1])``)."""
    proj_dim: int = 128
    """Output dimension of g (official ``--proj_out_dim 128``)."""
    embed_layer: int = 1
    """Representation for evaluation: 0 the backbone output, j the output of g's j-th layer. 1: the layer
    the paper fine-tunes from (Sec. 2; README ``--ft_proj_selector=1``). 0: official linear evaluation."""
    queue_size: int = 65536
    """K, memory entries (Sec. 3.1: a 64K memory buffer, after MoCo); 0 turns the memory off."""
    key_momentum: float = 0.999
    """EMA decay m of the memory network (Sec. 3.1, after MoCo)."""
    colour_strength: float = 1.0
    """Colour-distortion strength s (official ``--color_jitter_strength 1.0``; SimCLR App. A)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (SimCLR's augmentations, Sec. 3.1; SimCLR App. A)."""
    optimizer: str = "lars"
    """LARS (Sec. 3.1)."""
    base_lr: float = 0.4
    """Peak lr 6.4 = 0.1 sqrt(4096) at batch 4096 (Sec. 3.1), i.e. 0.4 per 256 (see Deviations)."""
    weight_decay: float = 1e-4
    """Sec. 3.1."""
    momentum: float = 0.9
    """LARS momentum (official ``--momentum 0.9``)."""
    warmup_epochs: int = 40
    """Linear warm-up over the first 5% of the 800 epochs, then cosine decay (Sec. 3.1)."""
    epochs: int = 800
    """Sec. 3.1."""
    batch_size: int = 4096
    """Sec. 3.1."""
    sync_batchnorm: bool = True
    """Global BN (Sec. 3.1; official ``--global_bn True``)."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64). k-NN
# figures from `selfsup train simclr-v2 --set ...` runs, at embed_layer 1 (its random init: 0.822) and, in
# brackets, at the backbone output (embed_layer 0; random init 0.839):
# - queue_size 1024: eight steps of keys (2 x 64 a step), below the 1,437 images, so the queue rarely holds
#   an older key of the anchor's own image (as MoCo's small preset). The memory costs accuracy at this
#   budget: queue_size 0 / 256 / 1024 give 0.931 (0.894) / 0.889 (0.858) / 0.889 (0.867); the preset keeps
#   it so that the benchmark runs the method with its memory (``--set queue_size=0``: SimCLR's loss with the
#   deeper head);
# - key_momentum 0.99: with 0.999 the memory network would move only 28% of the way to the online one in
#   330 steps (as MoCo's small preset);
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as SimCLR's small preset).
# Everything else is the paper's: LARS (0.4 x 64 / 256 = 0.1 peak), tau 0.1, the 3-layer head.
PRESETS = {"small": dict(min_scale=0.4, queue_size=1024, key_momentum=0.99)}


# --- augmentations (SimCLR's, Sec. 3.1; SimCLR App. A) -------------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """Two views from SimCLR's distribution: crop, flip, colour jitter (p=0.8), grayscale (p=0.2),
    blur (p=0.5) from 64 px on. Each view is one v2 pipeline; it takes a PIL image or a uint8 tensor."""
    s = cfg.colour_strength
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if image_size >= 64:
        kernel = int(0.1 * image_size) // 2 * 2 + 1  # 10% of the side, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose(steps), v2.Compose(steps)]


# --- heads ----------------------------------------------------------------------------------------


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """g as a Sequential of its layers (official ProjectionHead, 'nonlinear'): Linear - BN - ReLU for the
    middle layers, Linear - BN without shift for the last; no linear bias (BN's shift replaces it);
    kernels drawn from N(0, 0.01^2) as in the official LinearLayer."""
    layers, dim = [], in_dim
    for j in range(num_layers):
        last = j == num_layers - 1
        width = out_dim if last else hidden_dim
        linear = nn.Linear(dim, width, bias=False)
        nn.init.normal_(linear.weight, std=0.01)
        bn = nn.BatchNorm1d(width)
        if last:
            bn.bias.requires_grad_(False)  # center=False: the shift stays 0
            layers.append(nn.Sequential(linear, bn))
        else:
            layers.append(nn.Sequential(linear, bn, nn.ReLU(inplace=True)))
        dim = width
    return nn.Sequential(*layers)


# --- loss and memory ------------------------------------------------------------------------------


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


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# SimCLR's loss as simclr.py has it (its Eq. 1), used without memory.
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Eq. 1) averaged over the 2N anchors. z1, z2: (N, D) projections of the two views."""
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all1, offset = gather_with_grad(z1)  # (N_global, D)
    all2, _ = gather_with_grad(z2)
    keys = torch.cat([all1, all2])  # (2 N_global, D)
    queries = torch.cat([z1, z2])  # (2N, D)
    logits = queries @ keys.T / temperature  # (2N, 2 N_global)
    n_global = all1.shape[0]
    rows = torch.arange(2 * n, device=z1.device)
    local = torch.arange(n, device=z1.device) + offset
    self_col = torch.cat([local, local + n_global])  # where each query sits among the keys
    pos_col = torch.cat([local + n_global, local])  # its other view
    logits[rows, self_col] = float("-inf")  # k != i in the denominator
    return F.cross_entropy(logits, pos_col)


def memory_nt_xent(z1: torch.Tensor, z2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, memory: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """NT-Xent with the memory network's outputs as the contrasted examples, averaged over the 2N anchors.
    z1, z2: (N, D) this rank's online projections (the anchors); k1, k2: (N_global, D) the memory network's
    projections of the same views over the global batch; memory: (K, D) keys of earlier batches. No
    gradient flows into keys or memory. Anchor z1_i's positive is k2_i and the reverse; its own view's key
    k1_i is left out of the denominator (SimCLR's k != i)."""
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    offset = dist.get_rank() * n if dist.is_available() and dist.is_initialized() else 0  # this rank's rows
    keys = torch.cat([k1, k2, memory]).detach()  # (2 N_global + K, D)
    keys = F.normalize(keys, dim=1)
    queries = torch.cat([z1, z2])  # (2N, D)
    logits = queries @ keys.T / temperature  # (2N, 2 N_global + K)
    n_global = k1.shape[0]
    rows = torch.arange(2 * n, device=z1.device)
    local = torch.arange(n, device=z1.device) + offset
    self_col = torch.cat([local, local + n_global])  # the anchor's own view among the keys
    pos_col = torch.cat([local + n_global, local])  # its other view
    logits[rows, self_col] = float("-inf")  # k != i in the denominator
    return F.cross_entropy(logits, pos_col)


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


# --- model ----------------------------------------------------------------------------------------


class SimCLRv2(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.num_proj_layers < 1:
            raise ValueError(f"num_proj_layers must be at least 1, got {cfg.num_proj_layers}")
        if not 0 <= cfg.embed_layer <= cfg.num_proj_layers:
            raise ValueError(f"embed_layer must be in 0..num_proj_layers={cfg.num_proj_layers}, got {cfg.embed_layer}")
        if cfg.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {cfg.queue_size}")
        self.cfg = cfg
        head = projection_head(feature_dim, cfg.proj_hidden_dim or feature_dim, cfg.proj_dim, cfg.num_proj_layers)
        self.online = nn.Sequential(backbone, head)
        self.pending_keys: torch.Tensor | None = None  # this step's global keys, enqueued in on_step_end
        if cfg.queue_size > 0:
            self.momentum_encoder = copy.deepcopy(self.online).requires_grad_(False)  # same initial weights
            self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))  # (K, D)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.online[0]

    @property
    def projector(self) -> nn.Sequential:
        return self.online[1]

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"][:2]  # (N, C, H, W) each
        n = x1.shape[0]
        x = torch.cat([x1, x2])  # one pass over both views, as the official Model concatenates them
        z1, z2 = self.online(x).split(n)  # (N, proj_dim) each
        if self.cfg.queue_size == 0:
            loss = nt_xent(z1, z2, self.cfg.temperature)  # SimCLR's loss, with the deeper head
        else:
            with torch.no_grad():
                k1, k2 = F.normalize(self.momentum_encoder(x), dim=1).split(n)  # (N, proj_dim) each
                k1, k2 = concat_all_gather(k1), concat_all_gather(k2)  # (N_global, proj_dim): the global batch
            loss = memory_nt_xent(z1, z2, k1, k2, self.queue, self.cfg.temperature)
            self.pending_keys = torch.cat([k1, k2])  # (2 N_global, D), enqueued after the step
        with torch.no_grad():
            pos_sim = F.cosine_similarity(z1, z2).mean()
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step: the memory network follows the online one, and this batch's keys are
        enqueued. A loop of one's own must call this after every step. Nothing to do without memory."""
        if self.cfg.queue_size == 0:
            return
        ema_update(self.momentum_encoder, self.online, self.cfg.key_momentum)
        if self.pending_keys is not None:
            enqueue(self.queue, self.queue_ptr, self.pending_keys)
            self.pending_keys = None

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone output passed through the first ``embed_layer`` layers of g (see the docstring)."""
        h = self.backbone(x)  # (N, feature_dim)
        for layer in self.projector[: self.cfg.embed_layer]:
            h = layer(h)
        return h


MODEL = SimCLRv2


if __name__ == "__main__":
    z1, z2, memory = torch.randn(8, 128), torch.randn(8, 128), F.normalize(torch.randn(64, 128), dim=1)
    print("random:", memory_nt_xent(z1, z2, z1, z2, memory, 0.1).item(),
          "aligned:", memory_nt_xent(z1, z1, z1, z1, memory, 0.1).item())
