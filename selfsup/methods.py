"""The method interface: how the harness finds, configures and drives a method file.

A method file ``implementations/<family>/<method>.py`` imports only torch, torchvision and the standard
library and defines, top to bottom:

``Config``
    A frozen dataclass with the paper's hyperparameters. The harness reads these optional training
    fields when present: ``optimizer`` (``"sgd"``, ``"lars"`` or ``"adamw"``), ``base_lr`` (per 256
    images; the learning rate is ``base_lr * batch_size / 256``), ``weight_decay``, ``momentum``,
    ``betas``, ``warmup_epochs``, ``epochs``, ``batch_size``, ``sync_batchnorm``. Any field can be
    overridden from the command line with ``--set name=value``.
``augmentations(cfg, image_size, mean, std)``
    Returns the view recipe: a list of V torchvision v2 pipelines, one ``v2.Compose`` per view (two for
    SimCLR; T and T' for BYOL; 2 global + N local crops for multi-crop), each mapping one image (a uint8
    tensor (3, H, W) or a PIL image) to a float tensor (C, H_v, W_v). The file only declares it: the
    harness runs standard transforms batched on the training device with per-sample random parameters
    (`selfsup.views`) and falls back to running the pipelines per image in the loader workers, with
    a notice, when one has no batched counterpart. Views may have different sizes (multi-crop); the
    model receives ``batch["views"]`` as a list of V tensors (N, C, H_v, W_v). A pretext target of the
    method's own (rotations, permutations, masks) is made from the views inside ``forward``.
``PRESETS`` (optional)
    Named sets of Config changes, e.g. ``{"small": {...}}`` for CPU-sized runs where the paper's values
    do not fit (each documented in the file). The embedded ``digits`` data set asks for ``small``.
``MODEL``
    The ``nn.Module`` class, constructed as ``MODEL(backbone, feature_dim, cfg)``. It must provide
    ``forward(batch) -> dict`` with a scalar ``"loss"`` (and any scalars to log) and
    ``embed(images) -> (N, D)`` for evaluation. ``batch`` is a dict: ``views`` (list of V tensors),
    ``index`` (N,) sample indices into the training set (memory banks), ``label`` (N,) class labels
    (only for methods whose ``Config`` sets ``uses_labels = True``; otherwise the harness replaces
    them by -1 so that an unsupervised method cannot peek).

Optional hooks, called when defined:

``setup(num_samples, num_classes)``
    Once, before the optimizer is built: allocate memory banks, queues sized to the data set,
    prototypes, class-dependent heads.
``set_normalization(mean, std)``
    Right after construction: the data set's per-channel mean and std, with which every view and every
    evaluation image arrive normalised (a method that works in another colour space, e.g. CMC's Lab,
    undoes it first).
``on_step_end(step, total_steps)``
    After every optimizer step (``step`` counts finished steps): EMA targets and their schedules,
    queue bookkeeping, temperature or centre updates.
``on_epoch_start(epoch, total_epochs, features)``
    Before every epoch; ``features()`` returns embeddings of the whole training set in index order
    (computed with the evaluation transform, the model in eval mode), e.g. for DeepCluster's k-means;
    ``features(encode)`` uses ``encode(images) -> (n, D)`` in place of ``embed`` (e.g. PCL's momentum
    encoder).
``assign(images) -> (N,)``
    A clustering method's own cluster index of each image (the nearest prototype, the argmax of a
    cluster head); the evaluation scores it against the labels (NMI, ARI, cluster accuracy) beside
    k-means on the embeddings.
``param_groups()``
    Parameter groups when a method needs its own (e.g. a frozen part, a different learning rate). Besides
    the optimizer's keys a group may set ``fixed_lr: True`` (the peak rate throughout, no warm-up or
    decay: SimSiam's predictor), ``frozen_epochs: k`` (rate 0 during the first k epochs: DINO's last
    layer) and ``lr_scale`` (a factor on the scheduled rate); ``lars: False`` exempts it from LARS.

State that must survive a checkpoint (memory banks, queues, centres, cluster assignments) is kept in
registered buffers or parameters: checkpoints hold ``state_dict()``, the optimizer and the step.

See the docs page "Method interface" for how each family plugs into this.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
import typing
from pathlib import Path

from selfsup.catalog import ROOT, Catalog, load_catalog


class MethodError(Exception):
    """A method that cannot be found or configured."""


def implemented_methods(catalog: Catalog, variants: bool = True) -> dict[str, Path]:
    """Catalog id -> method file, for every entry with an implementation; ``variants=False`` leaves out the
    entries that run another entry's file with a ``preset`` (one id per file)."""
    return {e.id: catalog.root / e.implementation for e in catalog.sorted()
            if e.implementation and (variants or e.preset is None)}


def entry_preset(method: str, root: Path = ROOT) -> str | None:
    """The file preset a catalog id stands for (``moco`` -> ``v1`` of the MoCo v2 file); None for a path or
    for the entry a file is written for."""
    if Path(method).suffix == ".py":
        return None
    entry = load_catalog(root).entries.get(method)
    return entry.preset if entry else None


def load_method_module(method: str, root: Path = ROOT) -> types.ModuleType:
    """Import a method file from its catalog id (``simclr``) or a path to a ``.py`` file."""
    path = Path(method)
    if path.suffix == ".py":
        if not path.is_file():
            raise MethodError(f"{method}: no such method file")
        name = f"selfsup_method_{path.stem}"
    else:
        name = f"selfsup_method_{method.replace('-', '_')}"
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__selfsup_id_of__", None) == str(root):
            return loaded  # imported by id from this repository already: no need to re-read the catalog
        catalog = load_catalog(root)
        impl = implemented_methods(catalog)
        if method not in impl:
            if method in catalog.entries:
                raise MethodError(f"{method!r} is in the catalog but has no implementation yet; implemented: {', '.join(impl)}")
            import difflib

            close = difflib.get_close_matches(method, list(impl), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MethodError(f"unknown method {method!r}{hint}; implemented: {', '.join(impl)}")
        path = impl[method]
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    if path.suffix == ".py" and Path(method).suffix != ".py":
        module.__selfsup_id_of__ = str(root)  # loaded by catalog id, not from a path given by the user
    for attr in ("Config", "augmentations", "MODEL"):
        if not hasattr(module, attr):
            raise MethodError(f"{path}: a method file defines {attr} (see selfsup.methods)")
    return module


def _coerce(name: str, raw: str, annotation) -> object:
    origin = typing.get_origin(annotation)
    if annotation is bool or annotation == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if annotation in (int, "int"):
        return int(raw)
    if annotation in (float, "float"):
        return float(raw)
    if annotation in (str, "str"):
        return raw
    if origin is tuple or (isinstance(annotation, str) and annotation.startswith("tuple")):
        return tuple(float(x) if "." in x or "e" in x else int(x) for x in raw.strip("()").split(","))
    return raw


def make_config(
    module: types.ModuleType, overrides: dict[str, str] | None = None, preset: str | None = None,
    base: str | None = None,
):
    """The method's Config: the paper's defaults, then the ``base`` preset (the setting of a catalog entry
    that shares the file, e.g. MoCo v1's ``v1``), then the named preset from the file's ``PRESETS`` (if it
    defines one of that name; ``small`` sizes a run for the CPU), then ``name=value`` overrides coerced to
    the field types."""
    cfg = module.Config()
    presets = getattr(module, "PRESETS", {})
    if base is not None:
        if base not in presets:
            raise MethodError(f"{Path(module.__file__).name} has no preset {base!r}; it defines {', '.join(presets) or 'none'}")
        cfg = dataclasses.replace(cfg, **presets[base])
    if preset and preset != "paper" and preset != base and preset in presets:
        cfg = dataclasses.replace(cfg, **presets[preset])
    if not overrides:
        return cfg
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(module.Config)
    changes = {}
    for key, raw in overrides.items():
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MethodError(f"--set {key}={raw}: {module.Config.__module__} has no config field {key!r}{hint}")
        try:
            changes[key] = _coerce(key, raw, hints.get(key, fields[key].type))
        except ValueError as e:
            raise MethodError(f"--set {key}={raw}: {e}") from None
    return dataclasses.replace(cfg, **changes)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise MethodError(f"--set expects name=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
