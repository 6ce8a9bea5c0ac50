"""The page generator without mkdocs: data -> model -> templates, and its error handling (fast)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest
import yaml

from selfsup import site

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "site" / "templates"


def small_repo(tmp_path: Path, ids=("simclr", "byol")) -> Path:
    """A data root with the real taxonomy and a few entries written from scratch."""
    shutil.copytree(REPO / "taxonomy", tmp_path / "taxonomy")
    (tmp_path / "catalog").mkdir()
    base = {
        "title": "A Simple Framework | for Testing <Representations>",
        "authors": ["Ada Lovelace", "Alan Turing"],
        "year": 2020,
        "venue": "ICML 2020",
        "kind": "method",
        "family": "contrastive",
        "subfamily": "in_batch_negatives",
        "modalities": ["image"],
        "summary": "A summary that is long enough to pass validation, written for a test of the site.",
        "key_idea": "Contrast two views of the same image against the rest of the batch.",
        "loss_latex": r"\mathcal{L} = -\log \frac{a}{b}",
        "properties": {},
    }
    props = yaml.safe_load((tmp_path / "taxonomy" / "properties.yaml").read_text())["properties"]
    base["properties"] = {p["id"]: (False if p["type"] == "bool" else p["values"][0]) for p in props}
    for i, entry_id in enumerate(ids):
        data = dict(base, id=entry_id, year=2020 + i, builds_on=list(ids[:i]))
        (tmp_path / "catalog" / f"{entry_id}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path


def render(root: Path) -> dict[str, str]:
    return site.render_pages(root, templates=TEMPLATES, code_root=REPO)


def write_results(root: Path, name: str, data) -> None:
    (root / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (root / "benchmarks" / "results" / name).write_text(text)


# ------------------------------------------------------------------------------------------------


def test_pages_of_a_small_catalog(tmp_path):
    pages = render(small_repo(tmp_path))
    assert {
        "index.md",
        "papers/index.md",
        "papers/simclr.md",
        "papers/byol.md",
        "lineage.md",
        "compare/properties.md",
        "compare/measured.md",
        "api.md",
    } <= set(pages)
    assert "families/contrastive.md" in pages
    entry = pages["papers/byol.md"]
    assert entry.startswith("---\n")  # front matter first
    assert "$$\n\\mathcal{L} = -\\log \\frac{a}{b}\n$$" in entry
    assert "[simclr](simclr.md)" in entry  # builds on
    assert "&lt;Representations&gt;" in entry  # no raw HTML from catalog prose
    assert "```bibtex" in entry
    assert "Implementation" not in entry.split("## Cite")[0].split("## Summary")[1]  # none: no section
    # table cells escape pipes
    assert "A Simple Framework \\| for Testing" in pages["families/contrastive.md"]


def test_no_measurements_yet(tmp_path):
    pages = render(small_repo(tmp_path))
    assert "No measurements yet" in pages["compare/measured.md"]


def test_measured_results_shown(tmp_path):
    root = small_repo(tmp_path)
    write_results(
        root,
        "knn-digits.json",
        {
            "benchmark": "knn-digits",
            "title": "kNN on digits",
            "description": "Sample.",
            "dataset": "digits",
            "device": "cpu",
            "date": "2025-01-02",
            "command": "selfsup bench knn-digits",
            "rows": [
                {
                    "method": "simclr",
                    "backbone": "small_cnn",
                    "epochs": 3,
                    "knn_top1": 0.9312,
                    "random_init_knn_top1": None,
                    "rankme": 12.3,
                }
            ],
        },
    )
    page = render(root)["compare/measured.md"]
    assert "kNN on digits" in page and "93.1" in page and "12.3" in page
    assert "Linear top-1" not in page  # a metric column without any value is left out
    assert "No measurements yet" not in page


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ({"benchmark": "b", "title": "t", "rows": [{"method": "nope"}]}, "no catalog entry 'nope'"),
        (
            {"benchmark": "b", "title": "t", "rows": [{"method": "simclr", "knn_top1": 93.1}]},
            "rows.0.knn_top1",
        ),
        ({"title": "t", "rows": []}, "benchmark: Field required"),
    ],
)
def test_bad_results_file_stops_the_build(tmp_path, content, message):
    root = small_repo(tmp_path)
    write_results(root, "bad.json", content)
    with pytest.raises(site.SiteError) as info:
        render(root)
    assert "benchmarks/results/bad.json" in str(info.value)
    assert message in str(info.value)


def test_catalog_problems_stop_the_build_with_the_list(tmp_path, capsys):
    root = small_repo(tmp_path)
    (root / "catalog" / "broken.yaml").write_text("id: broken\ntitle: [unclosed\n")
    data = yaml.safe_load((root / "catalog" / "byol.yaml").read_text())
    data["builds_on"] = ["no-such-entry"]
    (root / "catalog" / "byol.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(site.SiteError) as info:
        render(root)
    text = str(info.value)
    assert "catalog/broken.yaml" in text and "no catalog entry 'no-such-entry'" in text
    # the CLI entry point refuses before starting mkdocs, and prints every problem
    assert site.build(root=root, out_dir=tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "catalog/broken.yaml" in err and "no-such-entry" in err
    assert not (tmp_path / "out").exists()


def test_strict_undefined_catches_template_mistakes(tmp_path):
    env = site.template_env(TEMPLATES)
    with pytest.raises(Exception, match="undefined"):
        env.from_string("{{ nothing.here }}").render()


def test_api_modules_skip_missing(tmp_path):
    (tmp_path / "selfsup").mkdir()
    (tmp_path / "selfsup" / "catalog.py").write_text("")
    assert site.module_exists(tmp_path, "selfsup.catalog")
    assert not site.module_exists(tmp_path, "selfsup.train")


@pytest.mark.parametrize(
    "src, dst, dirs, expected",
    [
        ("lineage.md", "papers/simclr.md", True, "../papers/simclr/"),
        ("index.md", "papers/simclr.md", True, "papers/simclr/"),
        ("papers/index.md", "papers/simclr.md", True, "simclr/"),
        ("papers/byol.md", "index.md", True, "../../"),
        ("lineage.md", "papers/simclr.md", False, "papers/simclr.html"),
    ],
)
def test_relative_url(src, dst, dirs, expected):
    assert site.relative_url(src, dst, dirs) == expected


@pytest.fixture(scope="module")
def to_html():
    """Markdown -> HTML with the Markdown extensions of mkdocs.yml, as mkdocs converts a page."""
    pytest.importorskip("mkdocs", reason="the site needs the 'site' extra: pip install -e '.[site]'")
    import markdown
    from mkdocs.config import load_config
    from mkdocs.utils.meta import get_data

    config = load_config(str(REPO / "mkdocs.yml"))

    def convert(text: str) -> str:
        body, _ = get_data(text)  # the front matter
        return markdown.markdown(body, extensions=config.markdown_extensions, extension_configs=config.mdx_configs)

    return convert


def test_catalog_strings_cannot_become_markup(hostile_root, hazards, to_html):
    pages = render(hostile_root)
    for path, text in pages.items():
        assert hazards(to_html(text)) == [], path
    page = to_html(pages["papers/hostile.md"])
    # shown as written: name, title, source, authors
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4
    assert "[a link](javascript:alert(1))" in html.unescape(page)
    assert 'class="arithmatex"' in page and r"a &lt; b \;\&amp;\;" in page  # math is escaped once, by arithmatex


def test_links_are_http_only_and_encoded():
    assert site._link("https://doi.org/10.1002/(SICI)1097") == "https://doi.org/10.1002/%28SICI%291097"
    for url in ("javascript:alert(1)", "data:text/html,x", "//example.com/x"):
        with pytest.raises(site.SiteError, match="not an http"):
            site._link(url)


def test_math_cannot_end_its_block():
    assert site._math("a\n\n  \nb $ c \\$") == "a\nb \\$ c \\$"


def test_recorded_commands_show_outside_paths_by_file_name():
    cmd = "selfsup bench overhead --data ../shared/data/cifar10-jpeg.tar.gz --out=/tmp/x/ --runs-dir runs/a"
    assert site._command(cmd) == (
        "` selfsup bench overhead --data path/to/cifar10-jpeg.tar.gz --out=path/to/x --runs-dir runs/a `")
