"""The CLI through its entry point, as a user runs it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("selfsup") or str(Path(sys.executable).parent / "selfsup")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_entry_point_help():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("validate", "list", "show", "bib"):
        assert cmd in r.stdout


def test_validate_passes_on_repo():
    r = run("validate")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("catalog OK:")


def test_validate_fails_with_located_messages():
    r = run("validate", "--catalog-dir", "tests/fixtures/broken/unknown_family")
    assert r.returncode == 1
    assert "unknown-family.yaml: family: unknown family 'contrasting'" in r.stderr
    assert "1 problem(s)" in r.stderr


def test_list_filters():
    r = run("list", "--family", "contrastive", "--year", "2020")
    assert r.returncode == 0, r.stderr
    assert "simclr" in r.stdout and "byol" not in r.stdout.split()
    r = run("list", "--kind", "method", "--year", "2020-2020")
    assert "simclr" in r.stdout and "byol" in r.stdout


def test_list_bad_filters_are_clear():
    r = run("list", "--family", "contrastve")
    assert r.returncode == 2
    assert "unknown value 'contrastve'; did you mean 'contrastive'?" in r.stderr
    r = run("list", "--year", "twenty")
    assert r.returncode == 2 and "--year expects YEAR or FROM-TO" in r.stderr


def test_show_entry_with_bibtex():
    r = run("show", "byol")
    assert r.returncode == 0
    assert "Bootstrap Your Own Latent" in r.stdout
    assert "@inproceedings{grill2020bootstrap," in r.stdout


def test_show_unknown_id_suggests():
    r = run("show", "barlowtwins")
    assert r.returncode == 2
    assert "no catalog entry 'barlowtwins'; did you mean barlow-twins" in r.stderr


def test_bib_selected_ids():
    r = run("bib", "simclr", "byol")
    assert r.returncode == 0
    assert r.stdout.count("@") == 2


@pytest.mark.parametrize("args", [["nosuchcommand"], ["show"], ["list", "--bogus"]])
def test_argparse_errors_exit_2(args):
    r = run(*args)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_help_names_every_backbone_and_does_not_import_torch():
    from selfsup import backbones, cli

    assert all(name in cli.BACKBONE_HELP for name in backbones.BACKBONES)
    code = "import sys, selfsup.cli as c; c.build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_unknown_backbone_is_a_clear_error():
    r = run("train", "simclr", "--backbone", "resnet9000", "--steps", "1")
    assert r.returncode == 2 and "unknown backbone 'resnet9000'; expected one of small_cnn" in r.stderr


def assert_one_line_error(r: subprocess.CompletedProcess, *expected: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for text in expected:
        assert text in r.stderr


def test_schema_into_missing_directory_is_a_clear_error(tmp_path):
    out = tmp_path / "missing_dir" / "schema.json"
    assert_one_line_error(run("schema", "-o", str(out)), f"-o {out}: directory {out.parent} does not exist")
    assert_one_line_error(run("schema", "-o", str(tmp_path)), f"-o {tmp_path}: cannot write it")


@pytest.mark.parametrize("command", [["validate"], ["site", "build"]])
def test_root_that_is_not_a_repository_is_a_clear_error(tmp_path, command):
    assert_one_line_error(run("--root", str(tmp_path / "nowhere"), *command), "no such directory")
    assert_one_line_error(run("--root", str(tmp_path), *command), "not a selfsup repository")


def test_misnamed_catalog_file_fails_validation(tmp_path):
    shutil.copy(ROOT / "catalog" / "simclr.yaml", tmp_path / "simclr.YAML")
    r = run("validate", "--catalog-dir", str(tmp_path))
    assert r.returncode == 1 and "catalog OK" not in r.stdout
    assert "simclr.YAML: catalog files are named <id>.yaml" in r.stderr


def test_site_build_keeps_what_it_does_not_own(tmp_path):
    (tmp_path / "x").write_text("the user's")
    assert_one_line_error(run("site", "build", "--out", str(tmp_path)), f"{tmp_path}: is not empty")
    assert (tmp_path / "x").read_text() == "the user's"
