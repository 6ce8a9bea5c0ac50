"""Fixtures of the site tests: the site is built once per test session, into a temporary directory.

SELFSUP_SITE_TEST_ROOT points the build at another data root (a copy of the repository with other
catalog entries, implementations or result files); by default it is this checkout.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from selfsup import catalog as cat

REPO = Path(__file__).resolve().parents[2]


@dataclass
class BuiltSite:
    root: Path  # data root the site was built from
    out: Path  # the built site
    catalog: cat.Catalog
    seconds: float

    def page(self, entry_id: str) -> Path:
        return self.out / "papers" / entry_id / "index.html"


@pytest.fixture(scope="session")
def site_root() -> Path:
    return Path(os.environ.get("SELFSUP_SITE_TEST_ROOT") or REPO).resolve()


@pytest.fixture(scope="session")
def built_site(site_root: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltSite:
    pytest.importorskip("mkdocs", reason="the site needs the 'site' extra: pip install -e '.[site]'")
    from selfsup import site

    catalog = cat.load_catalog(site_root)
    assert not catalog.problems, "the catalog has problems:\n" + "\n".join(map(str, catalog.problems))
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    # The served layout (directory URLs), as a build with $SELFSUP_SITE_URL set makes it.
    rc = site.build(root=site_root, out_dir=out, strict=True, offline=False)
    seconds = time.perf_counter() - start
    assert rc == 0, "selfsup.site.build(strict=True) failed; its output is above"
    return BuiltSite(site_root, out, catalog, seconds)


@pytest.fixture(scope="session")
def offline_site(site_root: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltSite:
    """The offline build (the default without $SELFSUP_SITE_URL), for reading from file://."""
    pytest.importorskip("mkdocs", reason="the site needs the 'site' extra: pip install -e '.[site]'")
    from selfsup import site

    out = tmp_path_factory.mktemp("offline-site")
    start = time.perf_counter()
    rc = site.build(root=site_root, out_dir=out, strict=True, offline=True)
    seconds = time.perf_counter() - start
    assert rc == 0, "the offline build failed; its output is above"
    return BuiltSite(site_root, out, cat.load_catalog(site_root), seconds)


# ------------------------------------------------------------------------------------------------
# A catalog entry that tries every way a catalog string could run script on the site.

XSS = "<script>alert(1)</script>"
HOSTILE_ENTRY = {
    "id": "hostile",
    "name": XSS,
    # mkdocs-material writes a page's heading into <title> unescaped; a line break could open a fence
    "title": f"Hostile </title>{XSS} [x](javascript:alert(1))\n```\n{XSS}",
    "authors": [f"Eve {XSS}"],
    "venue": "<img src=x onerror=alert(1)>",
    "summary": f"A summary with {XSS}, [a link](javascript:alert(1)) and <javascript:alert(1)>.\n"
    '{: onmouseover="alert(1)" }',
    "key_idea": '*Emphasis*{ onmouseover="alert(1)" } carrying an attribute list.',
    "loss_latex": r"\mathcal{L} = a < b \;\&\; " + XSS,
    "notes": [
        "[ref]: javascript:alert(1)",
        "A [reference link][ref], an ![image](javascript:alert(1)) and \\[an escape](javascript:alert(1)).",
        'A note\n{: onmouseover="alert(1)" }',
    ],
    "results": [
        {
            "benchmark": "imagenet-linear",
            "metric": "<b onmouseover=alert(1)>top1</b>",
            "value": 1.0,
            "backbone": XSS,
            "source": XSS,
            "notes": "[n](javascript:alert(1))",
        }
    ],
    "builds_on": ["simclr"],
}


@pytest.fixture(scope="session")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the real taxonomy, SimCLR's entry and :data:`HOSTILE_ENTRY` building on it."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(REPO / "taxonomy", root / "taxonomy")
    (root / "catalog").mkdir()
    simclr = yaml.safe_load((REPO / "catalog" / "simclr.yaml").read_text(encoding="utf-8"))
    simclr.update(builds_on=[], implementation=None)
    entries = [simclr, dict(simclr, **HOSTILE_ENTRY)]
    for data in entries:
        (root / "catalog" / f"{data['id']}.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    assert not cat.load_catalog(root).problems
    return root


class _Hazards(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.in_script = tag == "script"
        for name, value in attrs:
            value = (value or "").strip().lower()
            is_script_url = name in {"href", "src", "action"} and value.startswith(("javascript:", "data:"))
            if is_script_url or (name.startswith("on") and "alert" in value):
                self.found.append(f"<{tag} {name}={value!r}>")

    def handle_endtag(self, tag: str) -> None:
        self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script and "alert" in data:
            self.found.append(f"<script>{data}</script>")


def script_hazards(html: str) -> list[str]:
    """Where ``alert(...)`` could run in this HTML: in a script element, an event-handler attribute, or a
    ``javascript:``/``data:`` link."""
    parser = _Hazards()
    parser.feed(html)
    return parser.found


@pytest.fixture(scope="session")
def hazards():
    """:func:`script_hazards`, for the tests."""
    return script_hazards
