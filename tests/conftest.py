from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests (and the commands they launch) write extracted archives and decoded pixels here, never
    into the user's cache."""
    import os

    old = os.environ.get("SELFSUP_CACHE")
    os.environ["SELFSUP_CACHE"] = str(tmp_path_factory.mktemp("selfsup-cache"))
    yield
    if old is None:
        os.environ.pop("SELFSUP_CACHE", None)
    else:
        os.environ["SELFSUP_CACHE"] = old


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) each worker gets its share of the cores:
    torch's default of one thread per core in every worker would oversubscribe the machine."""
    import os

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for the commands the tests launch
