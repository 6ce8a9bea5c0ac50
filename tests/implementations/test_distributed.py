"""Under torchrun --nproc_per_node=2 (gloo, CPU), loss, gradients and buffers equal one process on the whole batch.

One launch (the module-scoped ``launch`` fixture) runs every selected method's check and the harness
check in the same process group (see ``ddp_worker``); each method then has its own test, which compares
what the ranks got with one process on the concatenated batch and fails naming that method alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from . import ddp_worker

WORKER = Path(ddp_worker.__file__)
ROOT = Path(__file__).resolve().parents[2]
METHODS = ddp_worker.implemented()


@dataclass
class Launch:
    returncode: int | None  # None: killed after the time limit
    output: str
    record: dict
    run_dir: Path | None

    def _context(self) -> str:
        how = "timed out" if self.returncode is None else f"exited {self.returncode}"
        running = self.record.get("running")
        where = f" while checking {running}" if running else ""
        return f"the torchrun launch {how}{where}; its output ends:\n{self.output[-3000:]}"

    def method(self, method: str) -> dict:
        result = self.record.get("methods", {}).get(method)
        if result is None:
            pytest.fail(f"{method}: no distributed result; {self._context()}", pytrace=False)
        errors = [f"rank {r}:\n{e}" for r, e in enumerate(result["errors"]) if e]
        if errors:
            pytest.fail(f"{method}: the DDP step raised\n" + "\n".join(errors), pytrace=False)
        return result

    def harness(self) -> dict:
        result = self.record.get("harness")
        if result is None:
            pytest.fail(f"harness: no result; {self._context()}", pytrace=False)
        errors = [f"rank {r}:\n{e}" for r, e in enumerate(result["errors"]) if e]
        if errors:
            pytest.fail("harness: selfsup.train.train raised under DDP\n" + "\n".join(errors), pytrace=False)
        return result


def _selected(request) -> tuple[list[str], bool]:
    """The methods and the harness check that this session will run (``-k simclr`` launches only SimCLR)."""
    items = [i for i in request.session.items if i.module is request.module]
    names = {getattr(i, "originalname", i.name) for i in items}
    chosen = {i.callspec.params["method"] for i in items
              if getattr(i, "originalname", "") == "test_two_ranks_equal_one_process"}
    return sorted(m for m in chosen if not ddp_worker.case_for(m).skip), "test_harness_trains_under_torchrun" in names


@pytest.fixture(scope="module")
def launch(request, tmp_path_factory) -> Launch:
    methods, harness = _selected(request)
    if not methods and not harness:
        return Launch(0, "", {}, None)
    tmp = tmp_path_factory.mktemp("ddp")
    out, run_dir = tmp / "ranks.pt", tmp / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out),
           "--methods", ",".join(methods)] + (["--harness", str(run_dir)] if harness else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240 + 10 * len(methods))
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = proc.communicate()
        returncode = None
    record = torch.load(out, weights_only=True) if out.exists() else {}
    return Launch(returncode, output, record, run_dir if harness else None)


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(method, request):
    case = ddp_worker.case_for(method)
    if case.skip:
        pytest.skip(f"{method}: {case.skip}")
    ranks = request.getfixturevalue("launch").method(method)

    loss, grads, backbone, buffers = ddp_worker.one_process(method)
    torch.testing.assert_close(ranks["loss"], loss, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{method}: rank-averaged loss vs one process\n{m}")
    assert set(grads) == set(ranks["grads"]), f"{method}: parameters with gradients differ: {set(grads) ^ set(ranks['grads'])}"
    assert backbone & set(grads), f"{method}: no gradient reaches the backbone, so the check would not cover it"
    for name, g in grads.items():
        torch.testing.assert_close(ranks["grads"][name], g, rtol=1e-4, atol=case.grad_atol,
                                   msg=lambda m, name=name: f"{method}: DDP gradient of {name} vs one process\n{m}")
    # state written from the batch (memory banks, queues) must hold the global batch, alike on every rank
    for rank, got in enumerate(ranks["buffers"]):
        assert set(got) == set(buffers), f"{method}: rank {rank} has buffers {sorted(got)}, one process {sorted(buffers)}"
        for name, b in buffers.items():
            torch.testing.assert_close(got[name], b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, rank=rank: f"{method}: rank {rank}'s buffer {name} after the step vs one process\n{m}")


@pytest.mark.distributed
def test_harness_trains_under_torchrun(launch):
    """The whole loop under DDP (gloo): each rank reads its shard; rank 0 writes and evaluates."""
    h = launch.harness()
    config = json.loads((launch.run_dir / "config.json").read_text())
    results = json.loads((launch.run_dir / "results.json").read_text())
    assert config["world_size"] == 2 and results["batch_size"] == 32 and results["steps"] == 3
    assert "knn_top1" in results["trained"]
    assert h["reported"] == [True, False]  # only rank 0 reports


def test_cases_name_implemented_methods():
    stale = set(ddp_worker.CASES) - set(METHODS)
    assert not stale, f"ddp_worker.CASES names methods that are not implemented: {sorted(stale)}"


def test_single_process_gather_is_identity():
    from selfsup import methods

    simclr = methods.load_method_module("simclr")
    x = torch.randn(4, 3)
    y, offset = simclr.gather_with_grad(x)
    assert y is x and offset == 0
