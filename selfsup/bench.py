"""Benchmark: train every implemented method under one budget and record k-NN / linear accuracy beside
the random-init baseline, as a JSON file under ``benchmarks/results/`` that the site shows.

The file format::

    {"benchmark": "knn-digits", "title": ..., "description": ..., "dataset": "digits",
     "device": ..., "date": "YYYY-MM-DD", "command": ...,
     "rows": [{"method": "simclr", "backbone": "small_cnn", "epochs": 25, "steps": ..., "batch_size": 256,
               "knn_top1": ..., "random_init_knn_top1": ..., "linear_top1": ..., "random_init_linear_top1": ...,
               "rankme": ..., "random_init_rankme": ..., "train_seconds": ...}]}
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfsup import catalog as cat
from selfsup import methods, train


def device_description(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def row(results: dict) -> dict:
    t, r = results["trained"], results["random_init"]
    return {
        "method": results["method"], "backbone": results["backbone"], "epochs": results["epochs"],
        "steps": results["steps"], "batch_size": results["batch_size"], "preset": results.get("preset"),
        "knn_top1": t.get("knn_top1"), "random_init_knn_top1": r.get("knn_top1"),
        "linear_top1": t.get("linear_top1"), "random_init_linear_top1": r.get("linear_top1"),
        "rankme": t.get("rankme"), "random_init_rankme": r.get("rankme"),
        **{key: value for key, value in cluster_columns(t, r).items() if value is not None},
        "train_seconds": results["train_seconds"],
    }


CLUSTER_METRICS = ("nmi", "ari", "cluster_acc")


def cluster_columns(trained: dict, random_init: dict) -> dict:
    """k-means cluster quality of the trained and the random-init features, and the method's own clusters."""
    out = {}
    for m in CLUSTER_METRICS:
        out[f"kmeans_{m}"] = trained.get(f"kmeans_{m}")
        out[f"random_init_kmeans_{m}"] = random_init.get(f"kmeans_{m}")
        out[f"assign_{m}"] = trained.get(f"assign_{m}")
    return out


def run_benchmark(
    name: str, data: str, method_ids: list[str] | None, out_file: Path, runs_dir: Path,
    data_dir: str | None = None, backbone: str = "small_cnn", epochs: int | None = None,
    steps: int | None = None, batch_size: int | None = None, device: str = "auto",
    linear_epochs: int = 100, workers: int = 0, description: str = "", preset: str = "auto",
    from_runs: list[str] | None = None,
) -> dict:
    """Train each method (or, with ``from_runs``, record finished runs made with the same settings) and
    merge its row into ``out_file``."""
    ids = _implemented(method_ids)
    # Rows of methods not re-run now are kept, so one method can be re-measured on its own.
    rows, previous = {}, {}
    if out_file.is_file():
        previous = json.loads(out_file.read_text())
        rows = {r["method"]: r for r in previous.get("rows", [])}
    dataset = Path(data).name.split(".")[0].split("-")[0] if "/" in data else data
    record = {
        "benchmark": name,
        "title": previous.get("title") or f"k-NN and linear probe on {dataset} ({backbone})",
        "description": description or previous.get("description", ""),
        "dataset": dataset,
        "device": device_description(device),
        "date": datetime.date.today().isoformat(),
        # recorded runs keep the command that reproduces them, not the bookkeeping invocation
        "command": (previous.get("command") or f"selfsup bench {name}") if from_runs else _command_line(),
        "rows": [],
    }
    def config_for(m: str, out: str) -> train.RunConfig:
        return train.RunConfig(
            method=m, data=data, data_dir=data_dir, backbone=backbone, epochs=epochs, steps=steps,
            batch_size=batch_size, out=out, device=device, num_workers=workers,
            linear_epochs=linear_epochs, progress=sys.stderr.isatty(), preset=preset,
        )

    finished = {}
    for run_dir in from_runs or []:
        results = recorded_run(Path(run_dir), config_for)
        finished[results["method"]] = results
    if from_runs:
        ids = [m for m in ids if m in finished] if method_ids is None else ids
        missing = [m for m in ids if m not in finished]
        if missing:
            raise train.TrainingError(f"--from-runs has no run of {', '.join(missing)}")
    else:
        runs_dir.mkdir(parents=True, exist_ok=True)  # a fresh directory per invocation: no earlier run is overwritten
        batch_dir = Path(tempfile.mkdtemp(prefix=f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}-", dir=runs_dir))
    for m in ids:
        rows[m] = row(finished[m] if m in finished else train.train(config_for(m, str(batch_dir / m))))
        print(f"{m}: k-NN {rows[m]['knn_top1']:.3f} vs random init {rows[m]['random_init_knn_top1']:.3f}", file=sys.stderr)
        record["rows"] = [rows[k] for k in sorted(rows)]
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(record, indent=2) + "\n")  # after every method: nothing is lost
    return record


# What a run must share with the benchmark's own run for its results to stand in for it: everything that
# changes what is trained or how it is evaluated (not where it ran or how its progress was shown).
SAME_AS_BENCHMARK = ("method", "data", "data_dir", "backbone", "image_size", "epochs", "steps", "batch_size",
                     "seed", "overrides", "preset", "augment", "evaluate", "knn_k", "knn_temperature",
                     "linear_epochs", "amp")


def recorded_run(run_dir: Path, config_for) -> dict:
    """The results of a finished run in ``run_dir``, after checking that it was made with the benchmark's
    settings and with the method file's current Config (a file edited since makes the run stale)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise train.TrainingError(f"{run_dir}: not a finished run ({e})") from None
    method = results.get("method") or Path(str(saved.get("run", {}).get("method", ""))).stem
    module, ds, cfg = train.load_method_and_data(config_for(method, str(run_dir)))
    want = dataclasses.asdict(config_for(method, str(run_dir)).resolved(cfg, ds))
    got = saved.get("run", {})
    diff = [k for k in SAME_AS_BENCHMARK if k != "method" and got.get(k) != want[k]]
    if Path(str(got.get("method"))).stem != method or diff:
        detail = ", ".join(f"{k}={got.get(k)!r} (benchmark: {want[k]!r})" for k in diff) or "another method"
        raise train.TrainingError(f"{run_dir}: not made with the benchmark's settings: {detail}")
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as config.json holds them
    if saved.get("method_config") != current:
        changed = sorted(k for k in current if saved.get("method_config", {}).get(k) != current[k])
        raise train.TrainingError(f"{run_dir}: {method}'s Config has changed since the run ({', '.join(changed)})")
    # the method file itself: its hash where the run recorded one, else it must not be newer than the run
    path = Path(module.__file__)
    if "method_file_sha256" in saved:
        stale = saved["method_file_sha256"] != train.file_sha256(path)
    else:
        stale = path.stat().st_mtime > (run_dir / "config.json").stat().st_mtime
    if stale:
        raise train.TrainingError(f"{run_dir}: {path.name} has changed since the run")
    if not results.get("trained"):
        raise train.TrainingError(f"{run_dir}: the run was not evaluated")
    return results


def _implemented(method_ids: list[str] | None) -> list[str]:
    available = methods.implemented_methods(cat.load_catalog_or_raise())
    ids = method_ids or list(available)
    unknown = [m for m in ids if m not in available]
    if unknown:
        raise methods.MethodError(f"not implemented: {', '.join(unknown)}; implemented: {', '.join(available)}")
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pure_step_seconds(rc: train.RunConfig, steps: int = 20, warmup: int = 5) -> float:
    """Seconds per model step on one fixed batch of finished views: forward, loss, backward, optimizer and
    the method's hooks, nothing of the data path (the floor the harness is measured against)."""
    run = train.build_run(rc)
    if hasattr(run.model, "on_epoch_start"):  # pseudo-labels, prototypes: what the first step needs, as in train_loop
        run.model.on_epoch_start(0, run.epochs, lambda encode=None: train._train_features(run, encode))
    _, batch = next(train.next_batches(run, 0))
    batch = train.make_views(run, batch, 0)
    run.ddp_model.train()
    for i in range(warmup):
        train.train_step(run, batch, i)
    _sync(run.device)
    t = time.perf_counter()
    for i in range(steps):
        train.train_step(run, batch, warmup + i)
    _sync(run.device)
    return (time.perf_counter() - t) / steps


def run_overhead(
    data: str, method_ids: list[str] | None, out_file: Path, data_dir: str | None = None,
    backbone: str = "small_cnn", batch_size: int = 256, steps: int = 60, device: str = "auto", workers: int = 2,
    preset: str = "paper",
) -> dict:
    """For each method: the pure model step on a fixed batch, the steady-state ``selfsup train`` step with
    the views made on the device and in the loader workers, and the throughput ratios (pure / train)."""
    ids = _implemented(method_ids)
    rows, previous = {}, {}
    if out_file.is_file():
        previous = json.loads(out_file.read_text())
        rows = {(r["method"], r.get("backbone"), r.get("device")): r for r in previous.get("rows", [])}
    dev_name = device_description(device)
    record = {
        "benchmark": "overhead",
        "title": "Harness overhead: the train step beside the pure model step",
        "description": previous.get("description") or (
            "Seconds per step at batch 256 on CIFAR-10 (the JPEG archive), the method's paper preset. pure: "
            "forward, loss, backward, optimizer and hooks on one fixed batch of views. device / loader: the "
            "steady-state `selfsup train` step (warm-up excluded) with the views made batched on the training "
            "device, or per image in the loader workers. ratio: pure / train, the fraction of the model's "
            "throughput the harness delivers."),
        "dataset": Path(data).name.split(".")[0] if "/" in data else data,
        "device": dev_name, "date": datetime.date.today().isoformat(), "command": _command_line(), "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="selfsup-overhead-") as tmp:
        for m in ids:
            rc = train.RunConfig(method=m, data=data, data_dir=data_dir, backbone=backbone, batch_size=batch_size,
                                 steps=steps, device=device, num_workers=workers, preset=preset, evaluate=False,
                                 progress=False, log_every=10, out=f"{tmp}/{m}-pure")
            pure = pure_step_seconds(rc)
            timed = {}
            for augment in ("device", "loader"):
                res = train.train(dataclasses.replace(rc, augment=augment, out=f"{tmp}/{m}-{augment}"))
                timed[augment] = res["step_seconds"]
            row = {"method": m, "backbone": backbone, "batch_size": batch_size, "device": dev_name, "workers": workers,
                   "steps": steps,  # train steps per view path (the steady state excludes the first log interval)
                   "pure_step_s": round(pure, 4), "train_step_device_s": round(timed["device"], 4),
                   "train_step_loader_s": round(timed["loader"], 4),
                   "device_ratio": round(pure / timed["device"], 3), "loader_ratio": round(pure / timed["loader"], 3)}
            rows[(m, backbone, dev_name)] = row
            print(f"{m}: pure {pure:.3f} s, train {timed['device']:.3f} s (device views), "
                  f"{timed['loader']:.3f} s (loader views): ratio {row['device_ratio']:.2f} / {row['loader_ratio']:.2f}",
                  file=sys.stderr)
            record["rows"] = sorted(rows.values(), key=lambda r: (r["method"], r["backbone"], r["device"]))
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_epoch_hook(
    data: str, method_ids: list[str] | None, out_file: Path, data_dir: str | None = None,
    backbone: str = "small_cnn", device: str = "auto", workers: int = 2, preset: str = "paper",
) -> dict:
    """For each method with an ``on_epoch_start`` hook: the seconds of one hook at epoch 0 on the whole
    training set, split into the features pass (``features()``, the evaluation transform through
    ``embed``) and the rest (k-means, PCA, Sinkhorn over the set, head resets)."""
    ids = [m for m in _implemented(method_ids) if hasattr(methods.load_method_module(m).MODEL, "on_epoch_start")]
    rows, previous = {}, {}
    if out_file.is_file():
        previous = json.loads(out_file.read_text())
        rows = {(r["method"], r.get("backbone"), r.get("device")): r for r in previous.get("rows", [])}
    dev_name = device_description(device)
    record = {
        "benchmark": "epoch-hook",
        "title": "Whole-data-set epoch hooks: seconds per hook",
        "description": previous.get("description") or (
            "One on_epoch_start at epoch 0 with the method's paper preset: the features pass over the whole "
            "training set (evaluation transform, the model's embed) and the method's own work on them "
            "(k-means, PCA whitening, Sinkhorn-Knopp over the set). Methods whose hook needs no features "
            "have only the second."),
        "dataset": Path(data).name.split(".")[0] if "/" in data else data,
        "device": dev_name, "date": datetime.date.today().isoformat(), "command": _command_line(), "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="selfsup-epoch-hook-") as tmp:
        for m in ids:
            rc = train.RunConfig(method=m, data=data, data_dir=data_dir, backbone=backbone, steps=1, device=device,
                                 num_workers=workers, preset=preset, evaluate=False, progress=False, out=f"{tmp}/{m}")
            run = train.build_run(rc)
            timing = {}

            def features(encode=None, run=run, timing=timing):
                t = time.perf_counter()
                out = train._train_features(run, encode)
                _sync(run.device)
                timing["features"] = time.perf_counter() - t
                return out

            t = time.perf_counter()
            with torch.no_grad():
                run.model.on_epoch_start(0, run.epochs, features)
            _sync(run.device)
            total = time.perf_counter() - t
            feats = timing.get("features")
            row = {"method": m, "backbone": backbone, "device": dev_name, "num_samples": len(run.ds.train),
                   "hook_features_s": round(feats, 2) if feats is not None else None,
                   "hook_work_s": round(total - (feats or 0.0), 2)}
            rows[(m, backbone, dev_name)] = row
            print(f"{m}: features {row['hook_features_s']} s, work {row['hook_work_s']} s", file=sys.stderr)
            record["rows"] = sorted(rows.values(), key=lambda r: (r["method"], r["backbone"], r["device"]))
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _command_line() -> str | None:
    """The command that produced the file, without the (long) description."""
    if sys.argv[1:2] != ["bench"]:
        return None
    args, skip = [], False
    for a in sys.argv[2:]:
        if skip:
            skip = False
        elif a == "--description":
            skip = True
        elif not a.startswith("--description="):
            args.append(shlex.quote(a))
    return " ".join(["selfsup bench", *args])
