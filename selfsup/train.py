"""One training loop for every method, and the evaluation of what it learned.

A run directory holds ``config.json`` (the run and method settings; it marks the directory as a run),
``metrics.jsonl`` (one line per logged step), ``checkpoints/last.pt`` (written atomically: to a temporary
file, then renamed) and, at the end, ``results.json`` with the trained model's metrics beside those of
the same backbone at its random initialisation.

The loop reads as the pipeline: [`build_run`][selfsup.train.build_run] (method, data, model, optimizer, views,
run directory), then per step [`next_batches`][selfsup.train.next_batches] ->
[`make_views`][selfsup.train.make_views] -> [`train_step`][selfsup.train.train_step] ->
[`RunLog.step`][selfsup.train.RunLog.step] -> [`maybe_checkpoint`][selfsup.train.maybe_checkpoint], and
[`finish`][selfsup.train.finish] evaluates and writes the results.

Views: the method's per-view pipelines run batched on the training device where they translate
(`selfsup.views`), else per image in the loader workers (``--augment loader``, or a recipe with a
transform of the method's own).

Reproducibility: every step reseeds the global RNG from (seed, step, rank), which makes the batched views and
any randomness of the method; per-image views are seeded from (seed, epoch, index) (see
[`selfsup.data`][selfsup.data]). So ``--resume`` continues with exactly the losses an uninterrupted run would
have had (on the CPU; cuDNN kernels may differ slightly).

Checkpoints: at the end of every epoch, every ``checkpoint_minutes`` of training (10 by default) and, if
asked, every ``checkpoint_every`` steps, so that a kill loses at most one epoch or ten minutes.

No per-step host synchronisation: the loss is checked for NaN/inf and read back every ``log_every``
steps (and before every checkpoint); a non-finite loss still stops the run, naming the step it appeared.

Distributed: under ``torchrun`` the process group is initialised from the environment (NCCL on CUDA,
gloo on CPU), each rank reads its shard of every global batch, the model is wrapped in DDP and, where
the method's Config asks for it, BatchNorm becomes SyncBatchNorm. Only rank 0 writes and evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from selfsup import backbones, data, evaluate, methods, views


class TrainingError(Exception):
    """Training stopped or cannot start: NaN loss, collapse, a bad setting, a run directory or checkpoint
    that cannot be used."""


RUN_MARKER = "config.json"
DEVICES = "auto, cpu, cuda or cuda:N"
MIN_IMAGE_SIZE = 8


@dataclass
class RunConfig:
    method: str
    data: str = "digits"
    data_dir: str | None = None
    backbone: str = "small_cnn"
    image_size: int | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    out: str | None = None
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    overrides: dict[str, str] = field(default_factory=dict)
    preset: str = "auto"
    augment: str = "device"
    evaluate: bool = True
    log_every: int = 10
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 10.0
    knn_k: int = 200
    knn_temperature: float = 0.1
    linear_epochs: int = 100
    collapse_threshold: float = 1e-4
    amp: bool = True
    progress: bool = True
    resume: bool = False

    def validate(self) -> None:
        """A bad setting is a TrainingError naming the flag, before anything is loaded or written."""
        for flag, value, low in [("--epochs", self.epochs, 1), ("--steps", self.steps, 1), ("--batch-size", self.batch_size, 1),
                                 ("--image-size", self.image_size, MIN_IMAGE_SIZE), ("--workers", self.num_workers, 0),
                                 ("--log-every", self.log_every, 1), ("--checkpoint-every", self.checkpoint_every, 1),
                                 ("--linear-epochs", self.linear_epochs, 0), ("--knn-k", self.knn_k, 1)]:
            if value is not None and value < low:
                raise TrainingError(f"{flag} must be at least {low}, got {value}")
        if self.epochs is not None and self.steps is not None:
            raise TrainingError("give --epochs or --steps, not both")
        if not self.checkpoint_minutes > 0:
            raise TrainingError(f"--checkpoint-minutes must be positive, got {self.checkpoint_minutes}")
        if self.augment not in ("device", "loader"):
            raise TrainingError(f"--augment must be device or loader, got {self.augment!r}")
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise TrainingError(f"--device: expected {DEVICES}, got {d!r}")

    def resolved_preset(self, ds: data.DataSet) -> str:
        """``auto`` means the data set's preset (``small`` for digits), else the paper's values."""
        return (ds.budget or {}).get("preset", "paper") if self.preset == "auto" else self.preset

    def resolved(self, cfg, ds: data.DataSet) -> RunConfig:
        """Fill epochs and batch size when not given: the data set's CPU budget where it has one
        (the embedded digits), else the method's Config (the paper's values)."""
        budget = ds.budget or {}
        epochs = self.epochs if self.epochs is not None else budget.get("epochs", getattr(cfg, "epochs", 100))
        epochs = None if self.steps is not None else epochs
        batch = self.batch_size if self.batch_size is not None else budget.get("batch_size", getattr(cfg, "batch_size", 256))
        return dataclasses.replace(self, epochs=epochs, batch_size=batch, preset=self.resolved_preset(ds))


# --- optimisation ---------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017). Parameter groups with
    ``lars=False`` (biases, norm layers) get plain SGD without weight decay, as in SimCLR and BYOL."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["lars"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay (and LARS adaptation) on weights, not on biases and normalisation parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    name = getattr(cfg, "optimizer", "sgd").lower()
    wd = getattr(cfg, "weight_decay", 0.0)
    groups = model.param_groups() if hasattr(model, "param_groups") else param_groups(model, wd)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=getattr(cfg, "momentum", 0.9), weight_decay=wd)
    for g in groups:
        g.pop("lars", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=getattr(cfg, "momentum", 0.9), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(getattr(cfg, "betas", (0.9, 0.999))), weight_decay=wd)
    raise TrainingError(f"unknown optimizer {name!r} in the method's Config; expected sgd, lars or adamw")


def group_lr(group: dict, lr: float, peak_lr: float, step: int, steps_per_epoch: int) -> float:
    """The rate of one parameter group at ``step``: the schedule's ``lr``, unless the method's
    ``param_groups()`` marked the group ``fixed_lr`` (the peak rate throughout, e.g. SimSiam's predictor)
    or ``frozen_epochs: k`` (rate 0 for the first k epochs, e.g. DINO's last layer), times ``lr_scale``."""
    if step < group.get("frozen_epochs", 0) * steps_per_epoch:
        return 0.0
    return (peak_lr if group.get("fixed_lr", False) else lr) * group.get("lr_scale", 1.0)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to peak_lr, then cosine decay to 0 (SimCLR Sec. 2.2, BYOL Sec. 3.3)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True``: a checkpoint from elsewhere cannot run code."""
    import pickle

    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TrainingError(
            f"checkpoint {path} holds objects other than tensors and plain containers, which only pickle could "
            "rebuild (and pickle can run code); nothing was loaded"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
        raise TrainingError(
            f"checkpoint {path} is corrupted, truncated or not a selfsup checkpoint ({type(e).__name__}); nothing was loaded"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise TrainingError(f"checkpoint {path} is not a selfsup checkpoint (no step); nothing was loaded")
    return state


# --- distributed ----------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """The process group was created here (not by a caller), so it is destroyed here too."""

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def resolve_device(device: str, d: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {device} was asked for, but no CUDA device is available")
        if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
            raise TrainingError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
        if d.world > 1:
            return torch.device("cuda", d.local_rank)
    return torch.device(device)


# --- helpers --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 999_983 + step * 7_907 + rank * 15_485_863 + 1) % (2**63 - 1)


def build_model(module, cfg, backbone_name: str, ds: data.DataSet, seed: int) -> nn.Module:
    """The method's model on a fresh backbone; a model with ``set_normalization`` is told the data set's
    mean and std (a method that converts colour spaces must undo the normalisation first)."""
    seed_everything(seed)  # same initial weights for the run and its random-init baseline
    backbone = backbones.build_backbone(backbone_name, ds.image_size)
    try:
        model = module.MODEL(backbone, backbone.feature_dim, cfg)
    except ValueError as e:  # what the method refuses at construction, e.g. a backbone without patch tokens
        raise TrainingError(f"{Path(getattr(module, '__file__', 'method')).stem}: {e}") from None
    if hasattr(model, "set_normalization"):
        model.set_normalization(tuple(ds.mean), tuple(ds.std))
    return model


def file_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def setup_model(model: nn.Module, rc: RunConfig, ds: data.DataSet) -> None:
    """The method's ``setup`` hook; bad input it reports (e.g. a teacher checkpoint named in the Config)
    becomes a one-line error naming the method."""
    if not hasattr(model, "setup"):
        return
    try:
        model.setup(len(ds.train), ds.num_classes)
    except (ValueError, OSError) as e:
        raise TrainingError(f"{Path(rc.method).stem}: {e}") from None


def default_out(rc: RunConfig) -> Path:
    return Path("runs") / f"{Path(rc.method).stem}-{rc.data.split('/')[-1].split('.')[0]}-{rc.backbone}"


def check_fresh_run_dir(out: Path) -> None:
    """A fresh run writes only into a missing or empty directory: nothing of an earlier run, or of
    anything else, is overwritten."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if (out / RUN_MARKER).is_file():
            raise TrainingError(
                f"{out} already holds a run; continue it with --resume --out {out}, or choose another --out"
            )
        raise TrainingError(f"{out} is not empty and is not a run directory; choose another --out")


def read_run_config(out: Path) -> dict:
    """``config.json`` of a run directory, checked: one-line errors naming the file."""
    path = out / RUN_MARKER
    if not path.is_file():
        raise TrainingError(f"{out} is not a run directory (no {RUN_MARKER})")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("run"), dict):
        raise TrainingError(f"{path}: has no 'run' settings")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(saved["run"]) - known)
    if unknown:
        raise TrainingError(f"{path}: unknown run setting(s) {', '.join(map(repr, unknown))}")
    if "method" not in saved["run"]:
        raise TrainingError(f"{path}: the run settings name no method")
    return saved


def method_from_run_dir(saved_method: str, given: str | None, path: Path) -> str:
    """The method of a run directory: only a catalog id is taken from it. A method file runs only when
    its path is given on the command line (and it must be the run's)."""
    is_file = saved_method.endswith(".py") or "/" in saved_method or os.sep in saved_method
    if given is None:
        if is_file:
            raise TrainingError(
                f"{path} names the method file {saved_method}; a run directory cannot choose code to run: "
                f"give the method on the command line (selfsup train {saved_method} --resume / selfsup eval --method ...)"
            )
        return saved_method
    if Path(given).stem != Path(saved_method).stem:
        raise TrainingError(f"{path} is a run of {saved_method!r}, not of {given!r}")
    return given


# --- the run: everything built before the first step ---------------------------------------------


@dataclass
class Run:
    rc: RunConfig
    d: Dist
    device: torch.device
    out: Path
    module: object
    cfg: object
    ds: data.DataSet
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plan: views.ViewPlan
    sampler: data.EpochSampler
    total_steps: int
    warmup_steps: int
    peak_lr: float
    use_amp: bool
    amp_dtype: torch.dtype
    channels_last: bool

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def global_batch(self) -> int:
        return self.rc.batch_size * self.d.world

    def record(self) -> dict:
        return {"run": {**asdict(self.rc), "out": str(self.out), "resume": False}, "method_config": asdict(self.cfg),
                "dataset": self.ds.name, "image_size": self.ds.image_size, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "peak_lr": self.peak_lr, "world_size": self.d.world,
                "augment": self.plan.mode, "method_file_sha256": file_sha256(self.module.__file__)}


def load_method_and_data(rc: RunConfig):
    """(module, data set, Config): the method's Config from the preset and ``--set`` overrides."""
    module = methods.load_method_module(rc.method)
    ds = data.load_dataset(rc.data, rc.data_dir, rc.image_size)
    known = ["paper", "auto", *getattr(module, "PRESETS", {})]
    if rc.preset not in known:
        raise TrainingError(f"--preset {rc.preset!r}: {Path(rc.method).stem} has no such preset; choose from {', '.join(known)}")
    base = methods.entry_preset(rc.method)  # `selfsup train moco`: MoCo v1, the v1 preset of the MoCo v2 file
    try:  # auto: small if the file has it, on top of the entry's preset
        cfg = methods.make_config(module, rc.overrides, rc.resolved_preset(ds), base)
    except methods.MethodError as e:
        raise TrainingError(f"{rc.method}: {e}") from None
    return module, ds, cfg


def build_run(rc: RunConfig) -> Run:
    """Everything a run needs, from its settings: method and data, model, optimizer, view plan, sampler
    and schedule, and the run directory (a fresh run refuses a non-empty one)."""
    rc.validate()
    d = init_distributed(rc.device)
    device = resolve_device(rc.device, d)
    out = Path(rc.out) if rc.out else default_out(rc)
    if d.main and not rc.resume:
        check_fresh_run_dir(out)
    module, ds, cfg = load_method_and_data(rc)
    rc = rc.resolved(cfg, ds)
    if d.main:
        print(ds.describe(), file=sys.stderr)

    model = build_model(module, cfg, rc.backbone, ds, rc.seed)
    setup_model(model, rc, ds)
    model.to(device)
    cuda = device.type == "cuda"
    channels_last = cuda and not rc.backbone.startswith("vit")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if d.world > 1 and cuda and getattr(cfg, "sync_batchnorm", False):  # SyncBatchNorm needs CUDA
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # no buffer broadcast: method state (banks, queues, EMA targets) is kept identical on every rank by the
    # method itself, and re-sending a memory bank of the training set before every forward would cost more
    # than the step; BN running statistics stay per rank (rank 0's are saved and evaluated)
    ddp_model = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
                 if d.world > 1 else model)

    sampler = data.EpochSampler(len(ds.train), rc.batch_size, rc.seed, d.rank, d.world)
    total_steps = rc.steps if rc.steps is not None else rc.epochs * sampler.batches_per_epoch
    peak_lr = getattr(cfg, "base_lr", 0.05) * rc.batch_size * d.world / 256
    warmup_steps = min(total_steps // 2, round(getattr(cfg, "warmup_epochs", 0) * sampler.batches_per_epoch))
    use_amp = rc.amp and cuda
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    plan = views.plan_views(module.augmentations(cfg, ds.image_size, ds.mean, ds.std), ds.train.in_memory, rc.augment)
    if plan.notice and d.main:
        print(f"{Path(rc.method).stem}: {plan.notice}", file=sys.stderr)
    return Run(rc, d, device, out, module, cfg, ds, model, ddp_model, build_optimizer(model, cfg, peak_lr),
               torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16), plan, sampler,
               total_steps, warmup_steps, peak_lr, use_amp, amp_dtype, channels_last)


def restore(run: Run) -> int:
    """Load the run's last checkpoint; the step to continue from (0 when it has none yet)."""
    if not run.ckpt_path.exists():
        return 0
    state = load_checkpoint(run.ckpt_path)
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"checkpoint {run.ckpt_path} does not match this method/backbone ({first})") from None
    return int(state["step"])


# --- batches and views ----------------------------------------------------------------------------


def next_batches(run: Run, step: int):
    """(epoch, CPU batch) from ``step`` on, each rank its shard. Decoded images whose views are all made
    on the device are gathered straight from memory; otherwise a DataLoader runs the per-image part."""
    rc, ds = run.rc, run.ds
    shared = run.plan.shared_input and ds.train.in_memory
    train_set = None if shared else data.ViewDataset(ds.train, run.plan.host, seed=rc.seed)
    labels = torch.as_tensor(ds.train.labels)
    while True:
        epoch, skip = divmod(step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch, skip)
        if shared:
            order = torch.as_tensor(list(run.sampler)).view(-1, rc.batch_size)
            batches = ({"views": [ds.train.pixels[idx]], "index": idx, "label": labels[idx]} for idx in order)
        else:
            train_set.set_epoch(epoch)
            batches = DataLoader(train_set, batch_size=rc.batch_size, sampler=run.sampler, num_workers=rc.num_workers,
                                 collate_fn=data.collate_views, pin_memory=run.device.type == "cuda", drop_last=True)
        for batch in batches:
            yield epoch, batch
            step += 1


def make_views(run: Run, batch: dict, step: int) -> dict:
    """Move a CPU batch to the device and make the method's views there; seeds the step's randomness."""
    torch.manual_seed(step_seed(run.rc.seed, step, run.d.rank))
    uses_labels = bool(getattr(run.cfg, "uses_labels", False))
    dev = run.device
    pin = dev.type == "cuda"
    moved = [(v.pin_memory() if pin else v).to(dev, non_blocking=True) for v in batch["views"]]
    fmt = torch.channels_last if run.channels_last else torch.contiguous_format
    views_ = [v.contiguous(memory_format=fmt) for v in run.plan.make_views(moved)]
    label = batch["label"] if uses_labels else torch.full_like(batch["label"], -1)
    return {"views": views_, "index": batch["index"].to(dev, non_blocking=True), "label": label.to(dev, non_blocking=True)}


def prepare_batch(batch: dict, device: torch.device, uses_labels: bool, channels_last: bool) -> dict:
    """A batch of finished views (per-image path, tests) moved to the device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views_ = [v.to(device, non_blocking=True, memory_format=fmt) for v in batch["views"]]
    label = batch["label"].to(device) if uses_labels else torch.full_like(batch["label"], -1).to(device)
    return {"views": views_, "index": batch["index"].to(device), "label": label}


# --- one step -------------------------------------------------------------------------------------


def train_step(run: Run, batch: dict, step: int) -> dict:
    """Forward, backward, optimizer and the method's hook. Returns the outputs (tensors, not read back)."""
    lr = lr_at(step, run.total_steps, run.warmup_steps, run.peak_lr)
    for g in run.optimizer.param_groups:
        g["lr"] = group_lr(g, lr, run.peak_lr, step, run.steps_per_epoch)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        outputs = run.ddp_model(batch)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(outputs["loss"]).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if hasattr(run.model, "on_step_end"):
        run.model.on_step_end(step + 1, run.total_steps)
    # the rate the first group (the backbone's, in every method's param_groups) was given, not the schedule's:
    # they differ where a method fixes, freezes or scales it
    return {**outputs, "lr": run.optimizer.param_groups[0]["lr"]}


class RunLog:
    """metrics.jsonl, the progress bar and the NaN guard. A non-finite loss is recorded on the device
    (the first step it appears) and read back every ``log_every`` steps and before every checkpoint."""

    def __init__(self, run: Run, step: int):
        self.run = run
        self.step_dev = torch.tensor(step, device=run.device)  # the step count, kept on the device
        self.first_bad = torch.tensor(-1, device=run.device)
        self.t_start, self.images, self.last_loss = time.perf_counter(), 0, float("nan")
        self.log_times: list[tuple[int, float]] = []  # (step, time) at each log step, after the sync
        self.fh = self.progress = None
        if run.d.main:
            path = run.out / "metrics.jsonl"
            kept = []
            if step and path.exists():  # drop lines logged after the checkpoint we resume from
                kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.fh = open(path, "w")  # noqa: SIM115
            self.fh.write("".join(ln + "\n" for ln in kept))
            if run.rc.progress:
                from tqdm import tqdm

                self.progress = tqdm(total=run.total_steps, initial=step, desc=Path(run.rc.method).stem, unit="step",
                                     dynamic_ncols=True, file=sys.stderr)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.fh is not None:
            self.fh.close()

    def watch(self, loss: torch.Tensor) -> None:
        """Record (on the device, without waiting for it) the first step whose loss is not finite."""
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where((self.first_bad < 0) & bad, self.step_dev, self.first_bad)
        self.step_dev += 1

    def check_finite(self) -> None:
        """Read the NaN flag back (one host synchronisation)."""
        bad = int(self.first_bad)
        if bad >= 0:
            ckpt = self.run.ckpt_path
            raise TrainingError(
                f"the loss became nan or inf at step {bad} (epoch {bad // self.run.steps_per_epoch}); stopping. "
                f"Lower the learning rate (--set base_lr=...) or check the inputs"
                + (f"; the last good checkpoint is {ckpt}" if ckpt.exists() else "")
            )

    def step(self, outputs: dict, batch: dict, step: int, epoch: int) -> None:
        """After step ``step`` (1-based count of finished steps)."""
        run = self.run
        self.watch(outputs["loss"])
        self.images += run.global_batch
        if step % run.rc.log_every == 0 or step == run.total_steps:
            self.check_finite()
            self.log_times.append((step, time.perf_counter()))
            _check_collapse(run.model, batch, run.rc.collapse_threshold, step)
            rate = self.images / (time.perf_counter() - self.t_start)
            rec = {"step": step, "epoch": epoch, "img_per_s": round(rate, 1)}
            rec.update({k: float(v.detach()) if torch.is_tensor(v) else v for k, v in outputs.items()})
            self.last_loss = rec["loss"]
            if self.fh is not None:
                self.fh.write(json.dumps(rec) + "\n")
                self.fh.flush()
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{self.last_loss:.4f}", img_s=f"{rate:.0f}")
        if self.progress is not None:
            self.progress.update(1)

    def steady_step_seconds(self) -> float | None:
        """Seconds per step between the first and the last log step (warm-up excluded; both ends follow a
        host synchronisation, so the figure holds on CUDA too)."""
        if len(self.log_times) < 2:
            return None
        (s0, t0), (s1, t1) = self.log_times[0], self.log_times[-1]
        return (t1 - t0) / (s1 - s0)


def maybe_checkpoint(run: Run, log: RunLog, step: int, epoch: int, last_save: float) -> float:
    """Save at the end of an epoch, every ``checkpoint_minutes`` and every ``checkpoint_every`` steps;
    returns the time of the last save. Only rank 0 writes; a non-finite loss is never saved."""
    rc = run.rc
    due = (step % run.steps_per_epoch == 0 or step == run.total_steps
           or (rc.checkpoint_every and step % rc.checkpoint_every == 0)
           or time.perf_counter() - last_save >= 60 * rc.checkpoint_minutes)
    if not (due and run.d.main):
        return last_save
    log.check_finite()
    save_checkpoint(run.ckpt_path, _state(run.model, run.optimizer, run.scaler, step))
    return time.perf_counter()


# --- the loop -------------------------------------------------------------------------------------


def train(rc: RunConfig) -> dict:
    """Train ``rc.method`` and return the results (also written to the run directory)."""
    run = build_run(rc)
    try:
        seconds, log = train_loop(run, restore(run) if rc.resume else 0)
        if run.d.world > 1:
            dist.barrier()  # every rank is past its last collective before any of them leaves
        return finish(run, seconds, log) if run.d.main else {}
    finally:
        if run.d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def train_loop(run: Run, step: int) -> tuple[float, RunLog]:
    """The steps from ``step`` to the end: views, step, log, checkpoint. Returns (seconds, log)."""
    if run.d.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / RUN_MARKER).write_text(json.dumps(run.record(), indent=2, default=str) + "\n")
    run.ddp_model.train()
    with RunLog(run, step) as log:
        last_save = time.perf_counter()
        batches = next_batches(run, step)
        while step < run.total_steps:
            epoch, batch = next(batches)
            if hasattr(run.model, "on_epoch_start") and step % run.steps_per_epoch == 0:
                run.model.on_epoch_start(epoch, run.epochs, lambda encode=None: _train_features(run, encode))
            batch = make_views(run, batch, step)
            outputs = train_step(run, batch, step)
            step += 1
            log.step(outputs, batch, step, epoch)
            last_save = maybe_checkpoint(run, log, step, epoch, last_save)
        return time.perf_counter() - log.t_start, log


def finish(run: Run, seconds: float, log: RunLog) -> dict:
    """Evaluate beside the random-init baseline and write results.json (rank 0)."""
    rc = run.rc
    trained, random_init = {}, {}
    if rc.evaluate:
        trained = evaluate_model(run.model, run.plan, run.ds, rc, run.device)
        baseline = build_model(run.module, run.cfg, rc.backbone, run.ds, rc.seed)
        setup_model(baseline, rc, run.ds)  # heads sized to the data set, as the trained model's
        baseline = baseline.to(run.device)
        random_init = evaluate_model(baseline, run.plan, run.ds, rc, run.device)
    results = {
        "method": Path(rc.method).stem, "dataset": run.ds.name, "backbone": rc.backbone,
        "epochs": run.epochs, "steps": run.total_steps, "batch_size": run.global_batch, "preset": rc.preset,
        "augment": run.plan.mode, "train_seconds": round(seconds, 1), "final_loss": log.last_loss,
        "step_seconds": log.steady_step_seconds(),
        "device": str(run.device), "trained": trained, "random_init": random_init,
    }
    (run.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["run_dir"] = str(run.out)
    return results


def _state(model, optimizer, scaler, step: int) -> dict:
    """Everything resume needs: a method's own state (banks, queues, centres, EMA targets) lives in its
    parameters and buffers, so ``state_dict`` carries it; the RNG is reseeded from the step."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step}


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_model(model: nn.Module, plan: views.ViewPlan, ds: data.DataSet, rc: RunConfig, device: torch.device) -> dict:
    """k-NN, linear probe, diagnostics and the cluster quality of k-means (k = the number of classes) of
    ``model.embed`` on the data set's test split; a model with ``assign`` also has its own clusters scored."""
    was_training = model.training
    model.eval()
    feats = [evaluate.extract_features(model.embed, s, ds.image_size, ds.mean, ds.std, device, num_workers=rc.num_workers)
             for s in (ds.train, ds.test)]
    (tr_x, tr_y), (te_x, te_y) = feats
    out = {"knn_top1": evaluate.knn_accuracy(tr_x, tr_y, te_x, te_y, ds.num_classes, rc.knn_k, rc.knn_temperature)}
    if rc.linear_epochs > 0:
        with torch.enable_grad():
            out["linear_top1"] = evaluate.linear_probe(tr_x, tr_y, te_x, te_y, ds.num_classes, epochs=rc.linear_epochs, seed=rc.seed)
    out.update(evaluate.diagnostics(te_x, *_view_pairs(model, plan, ds.test, device, rc.seed)))
    kmeans = evaluate.kmeans_labels(te_x, ds.num_classes, seed=rc.seed)
    out.update({f"kmeans_{k}": v for k, v in evaluate.cluster_quality(kmeans, te_y).items()})
    if hasattr(model, "assign"):  # a clustering method's own assignments (prototypes, cluster heads)
        own, _ = evaluate.extract_features(model.assign, ds.test, ds.image_size, ds.mean, ds.std, device,
                                           num_workers=rc.num_workers)
        out.update({f"assign_{k}": v for k, v in evaluate.cluster_quality(own.long(), te_y).items()})
    model.train(was_training)
    return out


def _view_pairs(model, plan: views.ViewPlan, split: data.Split, device, seed: int, n: int = 512):
    """Embeddings of two of the method's own views of up to n test images (for alignment), or (None, None)
    when the first two views differ in shape (multi-crop locals, pretext inputs)."""
    items = [data.ViewDataset(split, plan.host, seed=seed)[i] for i in range(min(n, len(split)))]
    batch = data.collate_views(items)
    with torch.random.fork_rng(devices=[]):  # the views' random draws are made on the CPU
        torch.manual_seed(seed)
        made = plan.make_views([v.to(device) for v in batch["views"]])
    if len(made) < 2 or made[0].shape != made[1].shape:
        return None, None
    return model.embed(made[0]).float().cpu(), model.embed(made[1]).float().cpu()


@torch.no_grad()
def _check_collapse(model: nn.Module, batch: dict, threshold: float, step: int, n: int = 64) -> None:
    """Stop when the embeddings of (up to n images of) the batch's first view have all but collapsed."""
    if threshold <= 0:
        return
    was = model.training
    model.eval()
    z = model.embed(batch["views"][0][:n]).float()
    model.train(was)
    std = evaluate.feature_std(z)
    if std < threshold:
        raise TrainingError(
            f"collapse at step {step}: the per-dimension std of the normalised embedding is {std:.2e} "
            f"(< {threshold:g}), i.e. all images map to nearly the same point. Stopping; check the "
            "method's collapse-prevention settings (--collapse-threshold 0 disables this guard)"
        )


@torch.no_grad()
def _train_features(run: Run, encode=None) -> torch.Tensor:
    """(N, D) features of the whole training set in index order, with the evaluation transform, from
    ``encode`` (images -> (n, D); the model's ``embed`` by default), the model in eval mode."""
    was = run.model.training
    run.model.eval()
    ds = run.ds
    feats, _ = evaluate.extract_features(encode or run.model.embed, ds.train, ds.image_size, ds.mean, ds.std, run.device,
                                         num_workers=run.rc.num_workers)
    run.model.train(was)
    return feats


# --- resume and evaluate a run directory -----------------------------------------------------------

RESUME_MAY_CHANGE = {"epochs", "steps", "device", "num_workers", "progress", "log_every", "checkpoint_every",
                     "checkpoint_minutes", "evaluate", "linear_epochs", "knn_k", "knn_temperature", "collapse_threshold"}


def resume(out: str | Path, method: str | None = None, **changes) -> dict:
    """Continue the run in ``out`` from its last checkpoint, with its saved settings, writing only into
    ``out``. ``changes`` may extend or shorten the run (``steps``/``epochs``) and change how it runs
    (device, workers, logging); settings that would make it a different run are refused."""
    out = Path(out)
    saved = read_run_config(out)
    run_settings = dict(saved["run"])
    run_settings["method"] = method_from_run_dir(run_settings["method"], method, out / RUN_MARKER)
    changes = {k: v for k, v in changes.items() if v is not None}
    for key, value in changes.items():
        if key not in RESUME_MAY_CHANGE and value != run_settings.get(key):
            raise TrainingError(f"--resume: {key} is {run_settings.get(key)!r} in {out / RUN_MARKER}; a resumed run keeps it")
    if "steps" in changes:
        run_settings["epochs"] = None
    if "epochs" in changes:
        run_settings["steps"] = None
    rc = RunConfig(**{**run_settings, **changes, "out": str(out), "resume": True})
    return train(rc)


def evaluate_run(out: str | Path, device: str = "auto", method: str | None = None) -> dict:
    """Evaluate the last checkpoint of a run directory beside the random-init baseline."""
    out = Path(out)
    saved = read_run_config(out)
    rc = RunConfig(**{**saved["run"], "device": device})
    rc.method = method_from_run_dir(rc.method, method, out / RUN_MARKER)
    rc.validate()
    module, ds, cfg = load_method_and_data(rc)
    dev = resolve_device(device, Dist())
    model = build_model(module, cfg, rc.backbone, ds, rc.seed)
    setup_model(model, rc, ds)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise TrainingError(f"checkpoint in {out} does not match its config: {str(e).strip().splitlines()[0]}") from None
    model.to(dev)
    baseline = build_model(module, cfg, rc.backbone, ds, rc.seed).to(dev)
    plan = views.plan_views(module.augmentations(cfg, ds.image_size, ds.mean, ds.std), ds.test.in_memory, rc.augment)
    return {
        "method": Path(rc.method).stem, "dataset": ds.name, "backbone": rc.backbone, "steps": int(state["step"]),
        "train_seconds": 0.0, "device": str(dev),
        "trained": evaluate_model(model, plan, ds, rc, dev),
        "random_init": evaluate_model(baseline, plan, ds, rc, dev),
    }
