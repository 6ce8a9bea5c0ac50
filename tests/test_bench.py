"""The benchmark command writes the result file the site reads, and re-running one method keeps the others."""

import json

from selfsup import bench


def test_bench_writes_and_merges_rows(tmp_path):
    out = tmp_path / "results" / "tiny.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"benchmark": "tiny", "title": "Tiny", "rows": [{"method": "byol", "knn_top1": 0.5}]}))
    record = bench.run_benchmark("tiny", "digits", ["simclr"], out, tmp_path / "runs", steps=2, batch_size=32,
                                 linear_epochs=0, description="a test")
    saved = json.loads(out.read_text())
    assert saved == record
    assert [r["method"] for r in saved["rows"]] == ["byol", "simclr"]  # byol's row kept
    row = saved["rows"][1]
    assert row["steps"] == 2 and 0 <= row["knn_top1"] <= 1 and 0 <= row["random_init_knn_top1"] <= 1
    assert saved["title"] == "Tiny" and saved["description"] == "a test" and saved["dataset"] == "digits"


def test_committed_results_are_valid_for_the_site():
    from selfsup import catalog as cat
    from selfsup import site

    measured, problems = site.load_measured(cat.ROOT, set(cat.load_catalog(cat.ROOT).entries))
    assert problems == []
    assert {m.data.benchmark for m in measured} >= {"knn-digits", "knn-cifar10-short"}


def test_bench_runs_twice_without_overwriting_a_run(tmp_path):
    out = tmp_path / "tiny.json"
    for _ in range(2):
        bench.run_benchmark("tiny", "digits", ["simclr"], out, tmp_path / "runs", steps=2, batch_size=32, linear_epochs=0)
    runs = sorted((tmp_path / "runs").glob("tiny-*/simclr/config.json"))
    assert len(runs) >= 1 and json.loads(out.read_text())["rows"][0]["steps"] == 2


def test_overhead_benchmark_rows(tmp_path):
    out = tmp_path / "overhead.json"
    record = bench.run_overhead("digits", ["simclr"], out, batch_size=32, steps=20, workers=0, device="cpu")
    (row,) = record["rows"]
    assert row["method"] == "simclr" and row["backbone"] == "small_cnn" and row["batch_size"] == 32
    for key in ("pure_step_s", "train_step_device_s", "train_step_loader_s"):
        assert 0 < row[key] < 60
    # the ratio is of the unrounded times: equal to the ratio of the rounded ones up to their rounding
    assert abs(row["device_ratio"] - row["pure_step_s"] / row["train_step_device_s"]) < 0.01
    assert json.loads(out.read_text()) == record


def test_from_runs_records_a_matching_run_and_refuses_others(tmp_path):
    import shutil

    import pytest

    from selfsup import train

    kw = dict(steps=2, batch_size=32, linear_epochs=0)
    first = bench.run_benchmark("tiny", "digits", ["simclr"], tmp_path / "a.json", tmp_path / "runs", **kw)
    (run_dir,) = (tmp_path / "runs").glob("tiny-*/simclr")
    again = bench.run_benchmark("tiny", "digits", ["simclr"], tmp_path / "b.json", tmp_path / "runs", from_runs=[str(run_dir)], **kw)
    assert again["rows"] == first["rows"]
    assert again["command"] == "selfsup bench tiny"  # the command that reproduces the rows, not the bookkeeping one
    with pytest.raises(train.TrainingError, match=r"not made with the benchmark's settings: steps=2 \(benchmark: 3\)"):
        bench.run_benchmark("tiny", "digits", ["simclr"], tmp_path / "c.json", tmp_path / "runs",
                            from_runs=[str(run_dir)], steps=3, batch_size=32, linear_epochs=0)
    stale = tmp_path / "stale"
    shutil.copytree(run_dir, stale)
    config = json.loads((stale / "config.json").read_text())
    config["method_file_sha256"] = "0" * 64  # as if simclr.py had been edited since
    (stale / "config.json").write_text(json.dumps(config))
    with pytest.raises(train.TrainingError, match="simclr.py has changed since the run"):
        bench.run_benchmark("tiny", "digits", ["simclr"], tmp_path / "d.json", tmp_path / "runs", from_runs=[str(stale)], **kw)
    with pytest.raises(train.TrainingError, match="not a finished run"):
        bench.run_benchmark("tiny", "digits", ["simclr"], tmp_path / "e.json", tmp_path / "runs", from_runs=[str(tmp_path)], **kw)


def test_epoch_hook_benchmark_times_features_and_work(tmp_path):
    out = tmp_path / "hook.json"
    record = bench.run_epoch_hook("digits", ["deepcluster", "iic", "simclr"], out, workers=0, preset="small")
    rows = {r["method"]: r for r in record["rows"]}
    assert set(rows) == {"deepcluster", "iic"}  # SimCLR has no epoch hook
    dc = rows["deepcluster"]
    assert dc["num_samples"] == 1437 and dc["hook_features_s"] > 0 and dc["hook_work_s"] > 0
    assert rows["iic"]["hook_features_s"] is None  # its hook only switches heads
    assert json.loads(out.read_text()) == record and record["benchmark"] == "epoch-hook"
