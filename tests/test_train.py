"""The training loop: exact resume, atomic checkpoints, NaN and collapse guards, CLI errors."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfsup import train

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("selfsup") or str(Path(sys.executable).parent / "selfsup")

# A tiny but real configuration: SimCLR with a small projector, 8 steps of batch 64 on digits.
TINY = dict(method="simclr", batch_size=64, steps=8, log_every=1, checkpoint_every=3, linear_epochs=0,
            overrides={"proj_hidden_dim": "32", "proj_dim": "16", "optimizer": "sgd", "base_lr": "0.5"},
            progress=False, knn_k=20, evaluate=False)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_run_directory(tmp_path):
    res = train.train(train.RunConfig(out=str(tmp_path / "run"), **{**TINY, "evaluate": True}))
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "results.json"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.pt").is_file()
    saved = json.loads((run / "results.json").read_text())
    assert set(saved["trained"]) >= {"knn_top1", "rankme", "feature_std", "uniformity", "alignment",
                                     "kmeans_nmi", "kmeans_ari", "kmeans_cluster_acc"}
    assert not any(k.startswith("assign_") for k in saved["trained"])  # SimCLR has no clusters of its own
    assert set(saved["random_init"]) == set(saved["trained"])
    assert saved["steps"] == 8 and len(losses(run)) == 8
    assert 0.0 <= res["trained"]["knn_top1"] <= 1.0


def test_a_clustering_method_has_its_own_clusters_scored(tmp_path):
    overrides = {"num_prototypes": "10", "proj_hidden_dim": "32", "proj_dim": "16", "n_local_crops": "0"}
    res = train.train(train.RunConfig(method="swav", out=str(tmp_path / "run"), batch_size=64, steps=2,
                                      linear_epochs=0, overrides=overrides, progress=False, knn_k=20))
    for which in ("trained", "random_init"):
        scores = res[which]
        assert {"assign_nmi", "assign_ari", "assign_cluster_acc", "kmeans_nmi"} <= set(scores)
        assert 0 <= scores["assign_nmi"] <= 1 and 0 <= scores["assign_cluster_acc"] <= 1


def interrupt_at(monkeypatch, at: int) -> None:
    """Make training stop at step ``at`` as a kill would (the collapse check runs at every logged step)."""
    real_check = train._check_collapse

    def check(model, batch, threshold, step):
        if step == at:
            raise KeyboardInterrupt("simulated interruption")
        real_check(model, batch, threshold, step)

    monkeypatch.setattr(train, "_check_collapse", check)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    train.train(train.RunConfig(out=str(tmp_path / "full"), **TINY))
    want = losses(tmp_path / "full")
    interrupt_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.RunConfig(out=str(tmp_path / "cut"), **TINY))
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    train.resume(tmp_path / "cut")
    got = losses(tmp_path / "cut")
    assert [round(x, 6) for x in got] == [round(x, 6) for x in want]
    assert got == want  # bitwise on the CPU


def test_truncated_checkpoint_is_a_clear_error_and_nothing_loads(tmp_path):
    train.train(train.RunConfig(out=str(tmp_path / "run"), **TINY))
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(train.TrainingError, match="corrupted, truncated or not a selfsup checkpoint"):
        train.resume(tmp_path / "run")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = train.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert not path.with_name("last.pt.tmp").exists()


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"step": Evil()}))
    with pytest.raises(train.TrainingError) as e:
        train.load_checkpoint(path)
    assert str(e.value).endswith("which only pickle could rebuild (and pickle can run code); nothing was loaded")


def test_nan_guard_stops_with_a_clear_message(tmp_path):
    cfg = dict(TINY, overrides={**TINY["overrides"], "temperature": "nan"})
    with pytest.raises(train.TrainingError, match=r"the loss became nan or inf at step 0 \(epoch 0\); stopping"):
        train.train(train.RunConfig(out=str(tmp_path / "run"), **cfg))


COLLAPSING = '''
import torch, torch.nn as nn
from dataclasses import dataclass
from torchvision.transforms import v2

@dataclass(frozen=True)
class Config:
    base_lr: float = 0.1
    optimizer: str = "sgd"

def augmentations(cfg, image_size, mean, std):
    t = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    return [t, t]

class Collapse(nn.Module):
    """Maps every image to the same point: exactly what the guard must catch."""
    def __init__(self, backbone, feature_dim, cfg=Config()):
        super().__init__()
        self.backbone = backbone
    def forward(self, batch):
        return {"loss": self.backbone(batch["views"][0]).sum() * 0.0}
    def embed(self, x):
        return torch.ones(len(x), 8) + 0.0 * self.backbone(x)[:, :1]

MODEL = Collapse
'''


def test_collapse_guard_stops_with_a_clear_message(tmp_path):
    method = tmp_path / "collapse.py"
    method.write_text(COLLAPSING)
    cfg = dict(TINY, method=str(method), overrides={})
    with pytest.raises(train.TrainingError, match="collapse at step 1: the per-dimension std"):
        train.train(train.RunConfig(out=str(tmp_path / "run"), **cfg))


def test_lr_schedule_warmup_then_cosine():
    lrs = [train.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_lars_skips_adaptation_for_biases():
    w = torch.nn.Parameter(torch.ones(4, 4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = train.LARS([{"params": [w], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0, "lars": False}],
                     lr=1.0, momentum=0.0)
    w.grad, b.grad = torch.full((4, 4), 10.0), torch.full((4,), 10.0)
    opt.step()
    # trust ratio eta * ||w|| / ||g|| = 0.001 * 4 / 40: w moves by 1e-3 per entry; b moves by the raw gradient
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 1 - 1e-3))
    torch.testing.assert_close(b.detach(), torch.full((4,), -9.0))


def cli(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "simclrr"], "unknown method 'simclrr'; did you mean 'simclr'?"),
        (["train", "balestriero-2023-cookbook"], "'balestriero-2023-cookbook' is in the catalog but has no implementation yet"),  # a survey
        (["train", "simclr", "--set", "temprature=0.2"], "has no config field 'temprature'; did you mean 'temperature'?"),
        (["train", "simclr", "--set", "temperature"], "--set expects name=value"),
        (["train", "simclr", "--set", "temperature=hot"], "--set temperature=hot: could not convert string to float"),
        (["train", "simclr", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "simclr", "--epochs", "1", "--steps", "2"], "give --epochs or --steps, not both"),
        (["train", "simclr", "--resume"], "--resume needs --out RUN_DIR"),
        (["train", "simclr", "--data", "nosuchset"], "unknown data set 'nosuchset'"),
        (["train", "msn", "--steps", "1"], "msn: MSN masks patch tokens and needs a ViT backbone"),
        (["train", "simclr", "--device", "cuda"], None),
        (["eval", "/nonexistent/run"], "is not a run directory"),
    ],
)
def test_cli_errors(args, message):
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert message is None or message in r.stderr, r.stderr


def test_cli_train_and_eval_roundtrip(tmp_path):
    out = tmp_path / "run"
    r = cli("train", "byol", "--steps", "4", "--batch-size", "64", "--linear-epochs", "0", "--no-progress",
            "--set", "proj_hidden_dim=32", "--set", "proj_dim=16", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "k-NN top-1" in r.stdout and "random init" in r.stdout
    r = cli("eval", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["steps"] == 4 and "knn_top1" in res["trained"]


# --- run directories: nothing lost, nothing executed ------------------------------------------------


def test_fresh_run_refuses_a_run_directory_and_keeps_it(tmp_path):
    out = tmp_path / "run"
    train.train(train.RunConfig(out=str(out), **TINY))
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(train.TrainingError, match=r"already holds a run; continue it with --resume --out"):
        train.train(train.RunConfig(out=str(out), **TINY))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(train.TrainingError, match="is not empty and is not a run directory"):
        train.train(train.RunConfig(out=str(other), **TINY))
    (tmp_path / "file").write_text("x")
    with pytest.raises(train.TrainingError, match="is a file, not a directory"):
        train.train(train.RunConfig(out=str(tmp_path / "file"), **TINY))


def test_resume_writes_only_where_it_is_pointed_and_honours_steps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train.train(train.RunConfig(out=str(a), **TINY))
    shutil.copytree(a, b)
    before_a = {p.name: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    res = train.resume(b, steps=12)
    assert res["steps"] == 12 and res["run_dir"] == str(b)
    assert torch.load(b / "checkpoints" / "last.pt", weights_only=True)["step"] == 12
    assert {p.name: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before_a
    assert len(losses(b)) == 12 and losses(b)[:8] == losses(a)
    with pytest.raises(train.TrainingError, match="batch_size is 64 in .*; a resumed run keeps it"):
        train.resume(b, batch_size=32)


def test_checkpoints_at_every_epoch_end(tmp_path, monkeypatch):
    """No --checkpoint-every: a kill in the second epoch loses at most that epoch."""
    cfg = dict(TINY, batch_size=256, steps=9, checkpoint_every=None)  # 1437 // 256 = 5 steps per epoch
    interrupt_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.RunConfig(out=str(tmp_path / "run"), **cfg))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 5


def test_checkpoints_every_few_minutes(tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 400))  # every call to the clock advances 400 s
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    cfg = dict(TINY, steps=4, checkpoint_every=None, checkpoint_minutes=10.0)
    saved = []
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, state: (saved.append(state["step"]), real_save(path, state)))
    train.train(train.RunConfig(out=str(tmp_path / "run"), **cfg))
    assert saved and saved[0] < 4 and saved[-1] == 4  # a save before the end: the clock, not the epoch


EVIL_METHOD = '''
from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("the run directory ran this file")
'''


def test_a_run_directory_cannot_choose_code_to_run(tmp_path):
    out = tmp_path / "run"
    train.train(train.RunConfig(out=str(out), **TINY))
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL_METHOD)
    config = json.loads((out / "config.json").read_text())
    config["run"]["method"] = str(evil)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(train.TrainingError, match="a run directory cannot choose code to run"):
        train.evaluate_run(out)
    with pytest.raises(train.TrainingError, match="a run directory cannot choose code to run"):
        train.resume(out)
    with pytest.raises(train.TrainingError, match="is a run of .*evil.py', not of 'simclr'"):
        train.resume(out, method="simclr")
    assert not (tmp_path / "EXECUTED").exists()


@pytest.mark.parametrize("content,match", [
    ("{not json", "config.json: not valid JSON"),
    ('{"dataset": "digits"}', "config.json: has no 'run' settings"),
    ('{"run": {"method": "simclr", "colour": 1}}', "config.json: unknown run setting\\(s\\) 'colour'"),
])
def test_bad_run_config_is_one_clear_line(tmp_path, content, match):
    (tmp_path / "config.json").write_text(content)
    r = cli("eval", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert re.search(match, r.stderr), r.stderr


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--image-size", "3"], "--image-size must be at least 8, got 3"),
    (["--image-size", "0"], "--image-size must be at least 8, got 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
    (["--preset", "smal"], "--preset 'smal': simclr has no such preset; choose from paper, auto, small"),
])
def test_bad_train_flags_are_one_clear_line(args, message):
    r = cli("train", "simclr", "--steps", "1", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_out_pointing_at_a_file_is_refused_and_kept(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("precious")
    r = cli("train", "simclr", "--steps", "1", "--out", str(f))
    assert r.returncode == 2 and "is a file, not a directory" in r.stderr and f.read_text() == "precious"


def test_debug_shows_the_traceback():
    r = cli("--debug", "train", "simclr", "--device", "tpu")
    assert r.returncode != 0 and "Traceback" in r.stderr and "TrainingError" in r.stderr


@pytest.mark.parametrize("augment", ["device", "loader"])
def test_both_view_paths_train(tmp_path, augment):
    res = train.train(train.RunConfig(out=str(tmp_path / "run"), augment=augment, **{**TINY, "steps": 3}))
    assert res["augment"] == augment and len(losses(tmp_path / "run")) == 3
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))


def test_large_images_crop_in_the_loader_and_train(tmp_path):
    """ImageFolder images above 128 px: decoded and cropped per image in workers, colour batched."""
    from tests.test_data import make_folder

    root = make_folder(tmp_path / "big", per_class=4, size=144)
    res = train.train(train.RunConfig(out=str(tmp_path / "run"), data=str(root), image_size=32, num_workers=1,
                                      **{**TINY, "batch_size": 4, "steps": 2, "evaluate": True}))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["augment"] == "device" and config["image_size"] == 32 and res["steps"] == 2
    assert 0 <= res["trained"]["knn_top1"] <= 1


def test_build_model_tells_the_model_the_data_sets_normalisation():
    import types

    import torch.nn as nn

    from selfsup import data

    class Recorder(nn.Module):
        def __init__(self, backbone, feature_dim, cfg):
            super().__init__()
            self.backbone, self.seen = backbone, None

        def set_normalization(self, mean, std):
            self.seen = (mean, std)

    ds = data.load_digits()
    model = train.build_model(types.SimpleNamespace(MODEL=Recorder), None, "small_cnn", ds, 0)
    assert model.seen == (tuple(ds.mean), tuple(ds.std))


def test_group_lr_follows_the_schedule_unless_the_group_says_otherwise():
    lr, peak, spe = 0.01, 0.05, 10
    assert train.group_lr({}, lr, peak, 3, spe) == lr
    assert train.group_lr({"fixed_lr": True}, lr, peak, 3, spe) == peak  # SimSiam's predictor
    assert train.group_lr({"lr_scale": 0.5}, lr, peak, 3, spe) == 0.5 * lr
    frozen = {"frozen_epochs": 1}  # DINO's last layer: rate 0 for the first epoch's steps 0..9
    assert [train.group_lr(frozen, lr, peak, s, spe) for s in (0, 9, 10)] == [0.0, 0.0, lr]


def test_bad_input_reported_by_setup_is_one_line(tmp_path):
    method = tmp_path / "needs_file.py"
    method.write_text(
        (Path(__file__).resolve().parents[1] / "implementations" / "contrastive" / "simclr.py").read_text()
        + "\n\ndef _setup(self, num_samples, num_classes):\n"
        "    raise ValueError('teacher checkpoint /nowhere.pt: no such file')\n\n"
        "SimCLR.setup = _setup\n"
    )
    rc = train.RunConfig(method=str(method), steps=1, batch_size=8, device="cpu", out=str(tmp_path / "run"),
                         num_workers=0, progress=False)
    with pytest.raises(train.TrainingError, match=r"^needs_file: teacher checkpoint /nowhere.pt: no such file$"):
        train.train(rc)


def test_logged_rate_is_the_one_the_backbone_was_given(tmp_path):
    """DirectPred keeps its rate constant (a ``fixed_lr`` group): the log shows the peak rate at every step,
    not the warm-up and cosine the schedule computes for other methods."""
    overrides = {"proj_hidden_dim": "32", "proj_dim": "16", "warmup_epochs": "0"}
    train.train(train.RunConfig(out=str(tmp_path / "run"), **{**TINY, "method": "tian-2021-understanding",
                                                               "overrides": overrides}))
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rates) == 8 and len(set(rates)) == 1 and rates[0] > 0


def test_an_entry_that_names_a_preset_trains_with_it_under_the_cpu_preset():
    """`selfsup train moco` is MoCo v1: the v1 preset of the MoCo v2 file, then digits' small preset."""
    module, _, v1 = train.load_method_and_data(train.RunConfig(method="moco"))
    _, _, v2 = train.load_method_and_data(train.RunConfig(method="moco-v2"))
    small, first = module.PRESETS["small"], module.PRESETS["v1"]
    assert all(getattr(v1, k) == v for k, v in {**first, **small}.items())
    assert all(getattr(v2, k) == v for k, v in small.items()) and v2.mlp and not v1.mlp
    paper = train.load_method_and_data(train.RunConfig(method="moco", preset="paper"))[2]
    assert paper == module.Config(**first)


def test_epoch_hook_features_are_the_whole_set_in_index_order_from_any_encoder(tmp_path):
    run = train.build_run(train.RunConfig(out=str(tmp_path / "run"), **TINY))
    n = len(run.ds.train)
    first = run.ds.train.pixels[:3].float()
    mean = torch.tensor(run.ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(run.ds.std).view(1, 3, 1, 1)
    want = (first / 255 - mean) / std  # the evaluation transform of digits: already 32 px, only normalised
    flat = train._train_features(run, lambda x: x.flatten(1))
    assert flat.shape == (n, want[0].numel())
    torch.testing.assert_close(flat[:3], want.flatten(1))
    run.model.train()
    feats = train._train_features(run)  # the model's embed, in eval mode, which is then restored
    assert feats.shape == (n, run.model.backbone.feature_dim) and run.model.training
