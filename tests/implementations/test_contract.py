"""Every method file keeps the contract: self-contained imports, the interface, its catalog entry."""

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from selfsup import catalog as cat
from selfsup import methods

ROOT = cat.ROOT
FILES = sorted((ROOT / "implementations").rglob("*.py"))
ALLOWED = {"torch", "torchvision"} | set(sys.stdlib_module_names)


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                roots.add("." * node.level)
            else:
                roots.add(node.module.split(".")[0])
    return roots


def test_there_are_implementations():
    assert len(FILES) >= 2


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_imports_only_torch_torchvision_stdlib(path):
    bad = imported_roots(path) - ALLOWED - {"__future__"}
    assert not bad, f"{path.name} imports {bad}"


COPIED_ALONE = """
import importlib, json, sys, traceback
import torch
from torchvision.transforms import v2
results = {}
for name, folder in json.loads(sys.argv[1]).items():
    sys.path.insert(0, folder)
    try:
        m = importlib.import_module(name)
        vs = m.augmentations(m.Config(), 32)
        assert isinstance(vs, list) and vs and all(isinstance(v, v2.Compose) for v in vs), "views: a list of v2.Compose"
        x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
        assert all(v(x).dtype == torch.float32 for v in vs), "each view pipeline maps a uint8 image to float"
        assert hasattr(m.MODEL, "embed"), "MODEL has no embed"
        results[name] = "ok"
    except Exception:
        results[name] = traceback.format_exc()
    finally:
        sys.path.remove(folder)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def copied_alone(tmp_path_factory) -> dict[str, str]:
    """One subprocess imports every file, each copied alone into an empty folder (nothing else importable)."""
    import json

    folders = {}
    for path in FILES:
        folder = tmp_path_factory.mktemp(path.stem)
        (folder / path.name).write_text(path.read_text())
        folders[path.stem] = str(folder)
    r = subprocess.run([sys.executable, "-c", COPIED_ALONE, json.dumps(folders)], capture_output=True, text=True,
                       cwd=tmp_path_factory.getbasetemp(), timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_works_when_copied_alone(path, copied_alone):
    assert copied_alone[path.stem] == "ok", copied_alone[path.stem]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_interface_and_docstring(path):
    module = methods.load_method_module(str(path))
    assert dataclasses.is_dataclass(module.Config) and module.Config.__dataclass_params__.frozen
    doc = module.__doc__ or ""
    assert "arXiv:" in doc and "Catalog id:" in doc and "Collapse" in doc, f"{path.name}: docstring incomplete"
    sig = inspect.signature(module.MODEL.__init__)
    assert list(sig.parameters)[1:3] == ["backbone", "feature_dim"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_view_recipe_translates_or_says_why(path):
    """A recipe of standard transforms runs batched on the device; one that does not names the transform."""
    from selfsup import views

    module = methods.load_method_module(str(path))
    pipelines = module.augmentations(module.Config(), 32, (0.5,) * 3, (0.25,) * 3)
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" or (plan.notice and "has no batched counterpart" in plan.notice)


def test_every_file_has_exactly_one_owning_catalog_entry_and_variants_name_its_presets():
    catalog = cat.load_catalog(ROOT)
    by_file, variants = {}, {}
    for e in catalog:
        if e.implementation:
            (variants if e.preset else by_file).setdefault(e.implementation, []).append(e)
    for path in FILES:
        rel = str(path.relative_to(ROOT))
        owners = [e.id for e in by_file.get(rel, [])]
        assert len(owners) == 1, f"{rel}: catalog entries without a preset {owners}"
        module = methods.load_method_module(str(path))
        assert f"Catalog id: ``{owners[0]}``" in module.__doc__
        assert path.parent.name == catalog.get(owners[0]).family
        for e in variants.get(rel, []):  # entries run as one of the file's presets (MoCo v1 in moco.py)
            assert e.preset in getattr(module, "PRESETS", {}), f"{e.id}: {rel} has no preset {e.preset!r}"


def test_shared_helpers_do_not_drift_between_copies():
    """Files are self-contained, so helpers are copied; a copy must stay identical to the others."""
    sources: dict[str, dict[str, str]] = {}
    for path in FILES:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SHARED_HELPERS:
                sources.setdefault(node.name, {})[path.name] = ast.unparse(node)
    for name, copies in sources.items():
        assert len(set(copies.values())) == 1, f"{name} differs between {sorted(copies)}"


# Helpers repeated across method files on purpose. Same-named functions left out of the set differ in what
# they take (each memory-bank method's nce_loss and estimate_z score its own pairs), so they are not copies.
SHARED_HELPERS = {"gather_with_grad", "_GatherWithGrad", "ema_update", "ema_rate", "concat_all_gather",
                  "find_feature_maps", "forward_with_maps", "_reduces", "_world", "update_bank", "draw_noise",
                  "encode", "local_crop_size", "ema_update_parameters", "DINOHead", "teacher_temperature",
                  "invariance_loss", "variance_loss", "covariance_loss", "enqueue", "multicrop_features",
                  "kmeans", "nearest_centroid", "multicrop_view", "encode_in_groups", "shuffled_keys",
                  "replace_input_conv", "nt_xent", "random_masking", "patchify", "sincos_2d",
                  "batch_center", "_wide", "_distributed", "projection_mlp", "prediction_mlp",
                  "four_rotations"}
