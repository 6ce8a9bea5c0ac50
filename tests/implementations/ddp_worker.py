"""Every method's distributed check, and the harness under DDP, in one torchrun launch (gloo, CPU).

    torchrun --standalone --nproc_per_node=2 tests/implementations/ddp_worker.py OUT.pt \\
        [--methods simclr,byol] [--harness RUN_DIR]

For each method (default: every implemented method of the catalog, less those whose ``CASES`` entry says
there is nothing to check), one DDP step on this rank's shard of a fixed global batch, all in the same
process group, then the method's ``on_step_end``. Rank 0 writes the rank-averaged loss, the DDP-averaged
gradients and every rank's buffers (banks, queues, targets) of every method to OUT.pt, rewritten after each method, so that a launch that dies still leaves the results before it and
names the method it was checking. ``test_distributed.py`` compares them with one process on the
concatenated batch (:func:`one_process`). A method that raises records the traceback of each rank
instead, and the launch moves on to the next method.

BatchNorm layers are replaced by identities in both: without SyncBatchNorm (CUDA only) each rank
normalises with its own statistics, which is a property of BN, not of the method's loss; the check
isolates what the method file controls.

With ``--harness RUN_DIR``, ``selfsup.train.train`` then trains SimCLR for 3 steps in the same process
group (``init_distributed`` reuses an initialised group): rank 0 writes and evaluates, each rank says
whether it reported.

Adding a method needs nothing here when it fits the generic pattern: two 8x8 views of 8 images in, a
scalar ``loss`` out, ``index`` = position in the global batch, ``label`` = -1 (or 2 classes when the
Config sets ``uses_labels``), ``setup(NUM_SAMPLES, NUM_CLASSES)`` before the forward, the global RNG
seeded alike before it on every rank and in the one-process run. Otherwise give it a ``Case`` in
``CASES``: ``skip`` (why there is nothing to check), Config ``overrides``, its own global ``batch``
(every tensor in it is split along dim 0 across ranks) or ``backbone``.

Teardown: the process ends with ``os._exit`` after a barrier, without interpreter finalisation. The
gloo worker threads signal a collective's completion before they drop their reference to it; when
that reference is the last one to a tensor made in Python, dropping it takes the GIL, and a thread that
takes the GIL once ``Py_FinalizeEx`` has begun is ended by ``pthread_exit``, which unwinds through a
``noexcept`` destructor: "terminate called without an active exception", SIGABRT (pytorch/pytorch
#190489). ``destroy_process_group`` does not prevent it: gloo has no ``shutdown``, and its threads are
joined only when the last reference to the group goes (with torch 2.14 both ``pt_gloo_runloop`` threads
are still running after ``destroy_process_group``, deleting the DDP model and ``gc.collect()``). The
barrier also keeps a rank from leaving while the other may still be in a collective with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from selfsup import backbones, catalog, methods

N = 8  # images in the global batch (split evenly across ranks)
NUM_SAMPLES, NUM_CLASSES = 16, 2  # what setup() is told about the "data set"
SMALL = {"proj_hidden_dim": "16", "proj_dim": "8"}  # applied where the Config has these fields
BUILD_SEED, FORWARD_SEED = 0, 1
TIMEOUT = timedelta(seconds=120)  # a rank left waiting by the other fails instead of hanging


@dataclass(frozen=True)
class Case:
    """How one method's check differs from the generic one."""

    skip: str | None = None
    """Why the method has nothing to check under DDP (shown as the test's skip reason)."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Config changes (``--set`` syntax) on top of ``SMALL``, e.g. to shrink wide heads."""
    batch: Callable[[object, int], dict] | None = None
    """``(cfg, n) -> batch`` with the global batch of n samples, instead of :func:`generic_batch`."""
    backbone: Callable[[], nn.Module] | None = None
    """A backbone with ``feature_dim``, instead of :func:`tiny_backbone` (e.g. a ViT for masking)."""
    grad_atol: float = 1e-6
    """Absolute tolerance of the gradient comparison (a missing 1/world_size is off by half, far above it)."""
    prepare: Callable[[nn.Module], None] | None = None
    """State set alike on every rank and in the one-process run before the forward (e.g. a full queue)."""


CASES: dict[str, Case] = {
    # its four views (the generic batch has two, which checks only the SimSiam case V = 2)
    "fastsiam": Case(batch=lambda cfg, n: {**generic_batch(cfg, n), "views": [
        torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1 + v)) for v in range(4)]}),
    "instdisc": Case(overrides={"nce_k": "8"}),  # 8 noise samples in a bank of 16
    "cmc": Case(overrides={"nce_k": "8"}),  # banks of 16: 8 negatives each
    "pirl": Case(overrides={"num_negatives": "8"}),
    # LayerNorm'd 2048-d embeddings score ~+-45, where float32 summation order exceeds the tolerance
    "dim": Case(overrides={"mi_units": "32"}),
    # multi-crop: two global and two local views of another size, the last layer not frozen so that it is checked
    "dino": Case(overrides={"out_dim": "16", "freeze_last_layer": "0"}, batch=lambda cfg, n: {
        "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((8, 8, 4, 4))],
        "index": torch.arange(n), "label": torch.full((n,), -1)}),
    # patch tokens (masks, the iBOT term) need a ViT: 16-px global views (a 4x4 grid of 4-px patches, 8 of the
    # 16 global crops masked) and 8-px local views (resized position embeddings); small heads
    "dinov2": Case(
        overrides={"out_dim": "16", "ibot_out_dim": "16", "ibot_proj_hidden_dim": "16", "ibot_proj_dim": "8"},
        backbone=lambda: backbones.ViT(backbones.ViTConfig(image_size=16, patch_size=4, dim=16, depth=1, heads=2)),
        batch=lambda cfg, n: {
            "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((16, 16, 8, 8))],
            "index": torch.arange(n), "label": torch.full((n,), -1)}),
    # a ViT, since MSN masks patch tokens: the target view and the masked anchor at 8 px (4 patches, 3 kept),
    # then two 4-px focal crops (one patch, resized position embeddings); 16 prototypes
    "msn": Case(overrides={"num_prototypes": "16"}, backbone=lambda: backbones.ViT(
        backbones.ViTConfig(image_size=8, patch_size=4, dim=16, depth=1, heads=2)), batch=lambda cfg, n: {
        "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((8, 8, 4, 4))],
        "index": torch.arange(n), "label": torch.full((n,), -1)}),
    # SMoG: two sets of two global crops and one local crop each (4 + 2M views); 4 groups in a batch of 8, beta
    # 0.5 so that the momentum grouping moves them, and a re-grouping (k-means on the memory, target reset) at
    # the step's end: 8 samples are half of setup's 16
    "smog": Case(overrides={"num_groups": "4", "n_local_crops": "1", "group_momentum": "0.5", "regroup_epochs": "0.5"},
                 batch=lambda cfg, n: {
        "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((8, 8, 8, 8, 4, 4))],
        "index": torch.arange(n), "label": torch.full((n,), -1)}),
    # SwAV: multi-crop (two global, two local views), 8 prototypes, and a full queue of 8 embeddings per assigned
    # view, so that the Sinkhorn problem spans the queue's shares and both ranks' columns; the queue is then written
    "swav": Case(overrides={"num_prototypes": "8", "n_local_crops": "2", "queue_length": "8", "epoch_queue_starts": "0",
                            "freeze_prototypes_epochs": "0"}, prepare=lambda model: _full_queue(model), batch=lambda cfg, n: {
        "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((8, 8, 4, 4))],
        "index": torch.arange(n), "label": torch.full((n,), -1)}),
    # DeepCluster trains on the pseudo-labels of its last clustering: 4 clusters of uneven weights
    "deepcluster": Case(overrides={"num_clusters": "4", "pca_dim": "8"}, prepare=lambda model: _pseudo_labels(model)),
    # ODC: memories of 16 samples in 4 clusters of sizes 6, 5, 3, 2 (rank 0's rows all in cluster 0, rank 1's in
    # 3, 1, 2, 1: different loss weights per rank); the step end recomputes the centroids and dissolves cluster 3
    # (below min_cluster_size 3) and refills it by a split; no dropout (its masks are drawn per rank)
    "odc": Case(overrides={"num_clusters": "4", "neck_hidden_dim": "16", "neck_dim": "8", "neck_dropout": "0",
                           "min_cluster_size": "3", "centroids_update_interval": "1"},
                prepare=lambda model: model.init_memory(torch.randn(16, 8, generator=torch.Generator().manual_seed(4)),
                                                        torch.tensor([0, 0, 0, 0, 3, 1, 2, 1, 0, 0, 1, 1, 1, 2, 2, 3]))),
    # TWIST with multi-crop: two global and two local views; the batch-mean distribution of 16 classes over the
    # global batch
    "twist": Case(overrides={"num_classes": "16", "n_local_crops": "2"}, batch=lambda cfg, n: {
        "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((8, 8, 4, 4))],
        "index": torch.arange(n), "label": torch.full((n,), -1)}),
    # IIC: x and three repeats, both heads every step (alternate false) so that both get gradients; head weights
    # x1000: at the official N(0, 0.01) init the outputs are near uniform and I ~ 1e-8 is rounding noise
    "iic": Case(overrides={"alternate": "false"}, prepare=lambda model: _sharpen_iic_heads(model),
                batch=lambda cfg, n: {**generic_batch(cfg, n), "views": [
        torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1 + v)) for v in range(4)]}),
    # SCAN's clustering stage (the pretext stage is SimCLR's check): mined neighbours (batch mates and others), a
    # bank of sharp stored predictions, heads x20 so that the entropy of the global mean prediction has a gradient;
    # four views (the anchor is the strong one), Cutout off (its per-rank draws would differ from one process)
    "scan": Case(overrides={"num_clusters": "4", "num_heads": "2", "num_neighbors": "3", "cutout_fraction": "0"},
                 prepare=lambda m: (m.stage.fill_(1), m.mined.fill_(True), m.best_head.fill_(1),
                                    m.neighbors.copy_((torch.arange(NUM_SAMPLES)[:, None] + torch.tensor([1, 5, 9])) % NUM_SAMPLES),
                                    m.bank.copy_(torch.softmax(3 * torch.randn(m.bank.shape, generator=torch.Generator().manual_seed(2)), -1)),
                                    [h.weight.data.mul_(20) for h in m.heads]),
                 batch=lambda cfg, n: {**generic_batch(cfg, n), "views": [
        torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1 + v)) for v in range(4)]}),
    # PCL after an E-step, alike on every rank: at 6 clusters the global batch (indices 0-7) holds all of them
    # (each rank's half only 4), at 8 clusters 4 of them, and 2 of the other 4 are drawn as negatives; uneven phi
    "pcl": Case(overrides={"num_clusters": "6,8", "queue_size": "16", "num_negative_prototypes": "2"},
                prepare=lambda model: model.set_clusters(
                    [torch.arange(NUM_SAMPLES) % 6, torch.arange(NUM_SAMPLES) // 2],
                    [nn.functional.normalize(torch.randn(k, 8, generator=torch.Generator().manual_seed(k)), dim=1) for k in (6, 8)],
                    [torch.linspace(0.1, 0.3, 6), torch.linspace(0.05, 0.4, 8)])),
    # DeepCluster-v2 after a clustering of a spread memory (two heads of 4 and 3 prototypes); the step's memory
    # writes, gathered across ranks, are among the buffers compared
    "deepcluster-v2": Case(overrides={"num_prototypes": "4,3"}, prepare=lambda model: _spread_memory_clustered(model)),
    # DCCM: 3 clusters, a 16-wide discriminator, the last linear layer x30 so that the originals' predictions
    # give a graph with links and separations across the two ranks' halves and confident pseudo-labels
    "dccm": Case(overrides={"num_clusters": "3", "mi_hidden_dim": "16"},
                 prepare=lambda model: model.head.hidden[3].weight.data.mul_(30)),
    # DEC in its KL stage: the epoch hook's k-means and target P over 16 images whose embeddings differ per rank
    # (x(1 + rank), as per-rank BN statistics make them), so that only rank 0's broadcast centres and q agree;
    # the last encoder layer x100, since a fresh narrow MLP maps all images to nearly one z (q, P near uniform)
    "dec": Case(overrides={"hidden_dims": "16,16,32", "embed_dim": "4", "recon_size": "4", "num_clusters": "3"},
                prepare=lambda model: (model.encoder[-1].weight.data.mul_(100), model.on_epoch_start(
                    model.cfg.pretrain_epochs, 2, lambda encode: encode(torch.randn(
                        NUM_SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
                    * (1 + (dist.get_rank() if dist.is_initialized() else 0))))),
    # SeLa trains on setup's random equal partition (4 labels, 2 heads): the same on every rank
    "sela": Case(overrides={"num_clusters": "4", "num_heads": "2"}),
    # NAT re-optimises the targets of the global batch of 8 (epoch 0 reassigns) by gathering features and indices:
    # the loss, gradients and the assignment buffer P must equal one process's; no dropout (its masks differ by shard)
    "noise-as-targets": Case(overrides={"dropout": "0.0"}),
    # Local Aggregation in its LA stage: 8 background neighbours in a bank of 16, two fixed clusterings (4
    # clusters each) set alike everywhere; the bank update must hold both ranks' rows
    "local-aggregation": Case(overrides={"background_k": "8", "num_kmeans": "2", "kmeans_k": "4"},
                              prepare=lambda model: (model.cluster_labels.copy_(torch.stack(
                                  [torch.arange(NUM_SAMPLES) % 4, torch.arange(NUM_SAMPLES) // 4])),
                                  model.aggregating.fill_(True))),
    # W-MSE whitens sub-batches of w_size images in proj_dim dimensions (it needs w_size > proj_dim): 2-d
    # embeddings, two sub-batches of 4 images drawn across both ranks, two random splits
    # whitening makes the first projector bias's gradient ~0 (centring), where float32 summation order left one of
    # 16 entries 1.4e-6 off in a CI run; its gradients are compared at 1e-5, as VIbCReg's
    "w-mse": Case(overrides={"proj_dim": "2", "w_size": "4", "w_iter": "2"}, grad_atol=1e-5),
    # Zero-CL whitens 8-d outputs of 8 images: both second moments are rank 7 after standardisation, and at the
    # paper's eps 0.01 the null direction amplifies float32 noise 10x; eps 0.1 keeps it within the tolerance
    "zero-cl": Case(overrides={"whiten_eps": "0.1"}),
    # CCA whitens proj_dim-d outputs with covariances of the global batch of 8: 3-d outputs keep them full rank
    # and well-conditioned (8-d ones would be rank 7, whitened only by the ridge)
    "deep-cca": Case(overrides={"proj_dim": "3"}),
    # a bank of 16 that the global batch of 8 half fills, so that batch mates are among the 2 neighbours
    "mean-shift": Case(overrides={"bank_size": "16", "topk": "2"}),
    # IterNorm whitens groups of 64 features: 2 groups of 4 of the 8-d embedding, so that the check covers a
    # whitening over the global batch of 8 (with 64 groups each feature would only be standardised)
    # IterNorm's Newton iterations amplify float32 summation-order noise: one gradient of 512 came out 2.5e-6
    # off in a CI run, so its gradients are compared at 1e-5
    "vibcreg": Case(overrides={"iternorm_groups": "2"}, grad_atol=1e-5),
    # Shuffled-DBN whitens without a ridge: with BN stripped the projections' std is ~0.015 and the whitening's
    # gradients scale as 1/std, so bias gradients that centring makes exactly 0 carry float32 noise above the
    # tolerance; inputs x20 and 4-d outputs in 2 shuffled groups of 2 keep it at ~0.3 of it
    # multi-crop: two global 8-px and two local 4-px views (every view predicts the global views' mean); 16 slices
    "lejepa": Case(overrides={"num_slices": "16"}, batch=lambda cfg, n: {
        "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((8, 8, 4, 4))],
        "index": torch.arange(n), "label": torch.full((n,), -1)}),
    # GCC past its pretext epochs: a 5-NN graph of 16 samples and a bank (z, q) from seeded random features, so
    # that RGC (gathered keys, bank neighbours), AGC (global columns, the same neighbour draw) and the bank write run
    "gcc": Case(overrides={"num_clusters": "4"}, prepare=lambda model: model.build_graph(
        torch.randn(NUM_SAMPLES, 8, generator=torch.Generator().manual_seed(2)),
        torch.randn(NUM_SAMPLES, 4, generator=torch.Generator().manual_seed(3)).softmax(dim=1))),
    # masked modeling without cross-sample terms: each image's loss uses only its own patches, and the random
    # masks are drawn per rank, so two ranks cannot reproduce one process's masks
    "mae": Case(skip="no cross-sample term: each image's loss uses only its own patches and its own random mask"),
    "simmim": Case(skip="no cross-sample term: each image's loss uses only its own pixels and its own random mask, "
                        "and every image masks the same number of pixels, so the per-rank means equal the global one"),
    "data2vec": Case(skip="no cross-sample term: each masked patch is scored against its own image's teacher target "
                          "(normalised per token or within the image), and the block masks are drawn per rank"),
    "i-jepa": Case(skip="no cross-sample term: each image's loss uses only its own patches (per-token layer norm); the "
                        "block sizes and the context truncation are drawn per rank's batch, as the official collator does"),
    "aim": Case(skip="no cross-sample term: each image's loss uses only its own patches after its own random prefix, "
                     "and the prefix lengths are drawn per rank"),
    "maskfeat": Case(skip="no cross-sample term: each image's HOG target and block mask are its own, and the masks are "
                          "drawn per rank"),
    "beit": Case(skip="no cross-sample term: each masked patch is scored against its own image's token from a fixed, "
                      "seeded codebook (the same on every rank), and the masks are drawn per rank"),
    "cae": Case(skip="no cross-sample term: each image's loss uses only its own patches, its own block mask and its "
                     "own encoder target"),
    # iBOT's two centres ([CLS] and patch tokens) are gathered across ranks: a ViT, 16-px global views (masked
    # patches, the MIM term) and 8-px local views, small heads
    "ibot": Case(overrides={"out_dim": "16", "patch_out_dim": "16"},
                 backbone=lambda: backbones.ViT(backbones.ViTConfig(image_size=16, patch_size=4, dim=16, depth=1, heads=2)),
                 batch=lambda cfg, n: {
                     "views": [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate((16, 16, 8, 8))],
                     "index": torch.arange(n), "label": torch.full((n,), -1)}),
    "data2vec-2": Case(skip="no cross-sample term: each masked patch is scored against its own image's teacher target, "
                            "the CLS target is the image's own mean, and the masks are drawn per rank"),
    # SiT: the NT-Xent of the contrastive tokens is gathered across ranks; rotations and corruptions (drawn per
    # rank) are turned off so that two ranks see the views one process sees; a ViT for the extra tokens
    "atito-2021-sit": Case(overrides={"contrastive_dim": "8", "rotate": "false", "gray_prob": "0", "blur_prob": "0",
                                      "max_noise_drop": "0", "max_replace_drop": "0"},
                           backbone=lambda: backbones.ViT(backbones.ViTConfig(image_size=8, patch_size=4, dim=16, depth=1, heads=2))),
    "hua-2021-decorrelation": Case(overrides={"proj_dim": "4", "num_groups": "2"}, batch=lambda cfg, n: {
        **generic_batch(cfg, n), "views": [20 * v for v in generic_batch(cfg, n)["views"]]}),
    # four augmentations: 6 augmentation pairs, negatives rolled by 1-6 over the global batch of 8 (most cross ranks)
    "relational-reasoning": Case(batch=lambda cfg, n: {**generic_batch(cfg, n), "views": [
        torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1 + v)) for v in range(4)]}),
}


def _full_queue(model: nn.Module) -> None:
    """SwAV's queue filled with unit vectors drawn from a fixed seed, marked full."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.queue.copy_(nn.functional.normalize(torch.randn(model.queue.shape, generator=g), dim=-1))
        model.queue_filled.fill_(model.queue.shape[0])


def _pseudo_labels(model: nn.Module) -> None:
    """DeepCluster's state after a clustering: a label per sample and the clusters' loss weights."""
    with torch.no_grad():
        model.assignments.copy_(torch.arange(NUM_SAMPLES) % 4)
        model.weights.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))


def _spread_memory_clustered(model: nn.Module) -> None:
    """DeepCluster-v2's memory filled with unit vectors from a fixed seed, then clustered (epoch 1's hook)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.memory.copy_(nn.functional.normalize(torch.randn(model.memory.shape, generator=g), dim=-1))
    model.on_epoch_start(1, 10, None)


def _sharpen_iic_heads(model: nn.Module) -> None:
    """IIC's sub-head weights scaled up, so that the outputs are far from uniform."""
    with torch.no_grad():
        for head in (model.main_head, model.over_head):
            head.linear.weight.mul_(1000)


def case_for(method: str) -> Case:
    return CASES.get(method, Case())


@functools.cache
def _method_files() -> dict[str, Path]:
    return methods.implemented_methods(catalog.load_catalog(), variants=False)  # one check per file


def implemented() -> list[str]:
    """Every implemented method of the catalog, by id."""
    return sorted(_method_files())


def load(method: str):
    """The method's module, from its file: ``load_method_module(id)`` would re-read the whole catalog
    on every call (seconds), once per method, per rank and in the test process."""
    return methods.load_method_module(str(_method_files()[method]))


def checked_methods() -> list[str]:
    return [m for m in implemented() if not case_for(m).skip]


# --- the model and the batch, built alike on every rank and in the one-process run ---------------


def strip_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_batchnorm(child)
    return module


def tiny_backbone() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    net.feature_dim = 32
    return net


def build(method: str) -> tuple[nn.Module, object, set[str]]:
    """(model with BN stripped and setup() done, its Config, names of the backbone's parameters)."""
    module = load(method)
    case = case_for(method)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    cfg = methods.make_config(module, {**{k: v for k, v in SMALL.items() if k in fields}, **case.overrides})
    torch.manual_seed(BUILD_SEED)
    backbone = (case.backbone or tiny_backbone)()
    model = module.MODEL(backbone, backbone.feature_dim, cfg)
    if hasattr(model, "setup"):
        model.setup(NUM_SAMPLES, NUM_CLASSES)
    if case.prepare is not None:
        case.prepare(model)
    strip_batchnorm(model)
    own = {id(p) for p in backbone.parameters()}
    return model, cfg, {n for n, p in model.named_parameters() if id(p) in own}


def generic_batch(cfg, n: int = N) -> dict:
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)]
    labels = torch.arange(n) % NUM_CLASSES if getattr(cfg, "uses_labels", False) else torch.full((n,), -1)
    return {"views": views, "index": torch.arange(n), "label": labels}


def global_batch(method: str, cfg) -> dict:
    return (case_for(method).batch or generic_batch)(cfg, N)


def shard(batch, rank: int, world: int):
    """This rank's rows of every tensor in the batch (lists and dicts are walked)."""
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % world:
            raise ValueError(f"a batch tensor of {batch.shape[0]} rows does not split over {world} ranks")
        k = batch.shape[0] // world
        return batch[rank * k : (rank + 1) * k]
    if isinstance(batch, dict):
        return {key: shard(v, rank, world) for key, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(v, rank, world) for v in batch)
    return batch


def end_step(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's after-step hook (queues, EMA targets), then its buffers: the state every rank must share."""
    if hasattr(model, "on_step_end"):
        model.on_step_end(1, 10)
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def one_process(method: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str], dict[str, torch.Tensor]]:
    """The reference on the whole batch: (loss, gradients by parameter name, backbone parameter names,
    buffers after the step)."""
    model, cfg, backbone = build(method)
    batch = global_batch(method, cfg)
    torch.manual_seed(FORWARD_SEED)
    loss = model(batch)["loss"]
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, backbone, end_step(model)


# --- under torchrun ---------------------------------------------------------------------------------


def ddp_step(method: str, rank: int, world: int) -> tuple[nn.Module, torch.Tensor]:
    model, cfg, _ = build(method)
    # as the harness wraps it: no buffer broadcast, which would hide a rank whose state drifted
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    batch = shard(global_batch(method, cfg), rank, world)
    torch.manual_seed(FORWARD_SEED)
    loss = ddp(batch)["loss"]
    loss.backward()
    return model, loss.detach()


def check_method(method: str, rank: int, world: int) -> dict:
    """Collectives in the same order on every rank, whether the method raised or not."""
    model, loss, error = None, None, ""
    try:
        model, loss = ddp_step(method, rank, world)
    except Exception:  # noqa: BLE001 - reported to the test, which names the method
        error = traceback.format_exc()
    errors = [""] * world
    dist.all_gather_object(errors, error)
    if any(errors):
        return {"errors": errors}
    mean_loss = loss.clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = [None] * world
    dist.all_gather_object(buffers, end_step(model))
    return {"errors": errors, "loss": mean_loss, "grads": grads, "buffers": buffers}


def check_harness(run_dir: str, rank: int, world: int) -> dict:
    from selfsup import train

    rc = train.RunConfig(method="simclr", steps=3, batch_size=16, device="cpu", out=run_dir, num_workers=0,
                         linear_epochs=0, progress=False, overrides={"proj_hidden_dim": "32"})
    reported, error = False, ""
    try:
        reported = bool(train.train(rc))
    except Exception:  # noqa: BLE001
        error = traceback.format_exc()
    if not dist.is_initialized():
        msg = "selfsup.train.train destroyed a process group that its caller had initialised"
        return {"reported": [reported] * world, "errors": [msg] * world}
    gathered = [None] * world
    dist.all_gather_object(gathered, (reported, error))
    return {"reported": [r for r, _ in gathered], "errors": [e for _, e in gathered]}


def save(record: dict, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    torch.save(record, tmp)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--methods", help="comma-separated method ids (default: every checked method; '' for none)")
    p.add_argument("--harness", metavar="RUN_DIR", help="also train SimCLR through selfsup.train into RUN_DIR")
    args = p.parse_args(argv)
    ids = checked_methods() if args.methods is None else [m for m in args.methods.split(",") if m]

    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    record = {"world_size": world, "methods": {}, "running": "", "harness": None}
    try:
        for method in ids:
            if rank == 0:
                record["running"] = method
                save(record, args.out)
            result = check_method(method, rank, world)
            if rank == 0:
                record["methods"][method] = result
                print(f"ddp_worker: {method}: {'raised' if any(result['errors']) else 'done'}", file=sys.stderr)
        if args.harness:
            if rank == 0:
                record["running"] = "harness"
                save(record, args.out)
            record["harness"] = check_harness(args.harness, rank, world)
        record["running"] = ""
        if rank == 0:
            save(record, args.out)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see "Teardown" above: no interpreter finalisation while gloo threads may still run
