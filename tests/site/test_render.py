"""The page generator without mkdocs: data -> model -> templates, and its error handling (fast)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest
import yaml

from selfsup import catalog as cat
from selfsup import site, site_search

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
    assert "[Lovelace et al. 2020](simclr.md)" in entry  # builds on: by name (first author, year), not id
    assert "&lt;Representations&gt;" in entry  # no raw HTML from catalog prose
    assert "```bibtex" in entry
    assert "Implementation" not in entry  # none: no section
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
    for name in ("lineage-data.js", "papers-data.js", "methods-data.js"):  # scripts: no markup character
        data = pages.pop(f"assets/generated/{name}")
        assert "hostile" in data and not set("<>&") & set(data), name
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


def front_matter(page: str) -> dict:
    return yaml.safe_load(page.split("---\n")[1])


def write_entry(root: Path, entry_id: str, **changes) -> None:
    path = root / "catalog" / f"{entry_id}.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------------------------
# Search: plain-text titles, keywords, the summary as the snippet


def test_plain_text_titles():
    assert site_search.plain_text("AstroM$^3$: A model") == "AstroM³: A model"
    assert site_search.plain_text(r"\(\alpha\)-skew and $x_{1}$ and $k^{th}$") == "α-skew and x₁ and k^th"
    assert site_search.plain_text("No math, $5 only") == "No math, $5 only"


def test_titles_with_math_are_plain_text(tmp_path):
    root = small_repo(tmp_path)
    write_entry(root, "byol", name="AstroM3", title="AstroM$^3$: A self-supervised multimodal model")
    pages = render(root)
    entry = pages["papers/byol.md"]
    assert front_matter(entry)["title"] == "AstroM³: A self-supervised multimodal model"  # name in title
    assert "# AstroM³: A self-supervised multimodal model\n" in entry
    assert "$^3$" not in pages["papers/index.md"]


def test_keywords_and_synonyms_are_search_tags(tmp_path):
    root = small_repo(tmp_path, ids=("simclr", "byol", "mae"))
    write_entry(root, "simclr", name="SimCLR", tags=["nt-xent"])
    write_entry(root, "byol", name="BYOL", family="distillation", subfamily="momentum_teacher")
    byol = yaml.safe_load((root / "catalog" / "byol.yaml").read_text())
    write_entry(root, "byol", properties=dict(byol["properties"], momentum_encoder=True, negatives=False))
    mae = yaml.safe_load((root / "catalog" / "mae.yaml").read_text())
    write_entry(root, "mae", name="MAE", family="masked_modeling", subfamily="pixel_targets",
                properties=dict(mae["properties"], masking=True))
    pages = render(root)
    tags = {i: front_matter(pages[f"papers/{i}.md"])["tags"] for i in ("simclr", "byol", "mae")}
    assert tags["simclr"][0] == "SimCLR" and "nt-xent" in tags["simclr"]  # the id is the name, once
    assert {"InfoNCE", "Ada Lovelace"} <= set(tags["simclr"])
    assert {"self-distillation", "negative-free", "non-contrastive", "momentum encoder"} <= set(tags["byol"])
    assert {"MIM", "masked image modeling", "masked image modelling"} <= set(tags["mae"])
    assert "MIM" not in tags["simclr"] and "negative-free" not in tags["simclr"]
    assert front_matter(pages["papers/simclr.md"])["search"]["boost"] > 1


def test_metadata_is_out_of_search_and_the_summary_leads(tmp_path):
    entry = render(small_repo(tmp_path))["papers/byol.md"]
    body = entry.split("\n# ", 1)[1]
    meta_start, meta_end = body.index('<div class="selfsup-meta" data-search-exclude markdown>'), body.index("</div>")
    assert meta_start < body.index("Ada Lovelace") < body.index("**Catalog id:**") < meta_end
    summary = body.index("A summary that is long enough")
    assert meta_end < summary < body.index("!!! abstract") < body.index("\n## ")  # in the h1 section


def test_listing_tables_are_out_of_search(tmp_path):
    pages = render(small_repo(tmp_path))
    assert '<table id="paper-index" data-search-exclude markdown>' in pages["papers/index.md"]
    assert '<div class="selfsup-matrix" data-search-exclude markdown>' in pages["compare/properties.md"]
    assert "<div data-search-exclude markdown>" in pages["families/contrastive.md"]


# ------------------------------------------------------------------------------------------------
# Smaller defects: names not ids, static key/value tables, filters that match something


def test_entries_are_named_not_by_id(tmp_path):
    root = small_repo(tmp_path)
    write_entry(root, "byol", name="BYOL")
    pages = render(root)
    assert "| Year | Name | Paper | Kind | Code |" in pages["families/contrastive.md"]
    assert "| Id |" not in pages["families/contrastive.md"]
    timeline = pages["timeline.md"]
    assert "[Lovelace et al. 2020](papers/simclr.md)" in timeline and "[BYOL](papers/byol.md)" in timeline
    assert "[simclr]" not in timeline
    assert "- [Lovelace et al. 2020](simclr.md) — A Simple Framework" in pages["papers/byol.md"]


def test_key_value_tables_are_static(tmp_path):
    entry = render(small_repo(tmp_path))["papers/byol.md"]
    props = entry.split("## Properties")[1]
    assert props.index('<div class="selfsup-static" markdown>') < props.index("| Property | Value | Meaning |")


def test_index_offers_only_kinds_and_modalities_that_match(tmp_path):
    index = render(small_repo(tmp_path))["papers/index.md"]
    assert '<option value="method">Method (2)</option>' in index
    assert 'value="dataset"' not in index and 'value="theory"' not in index
    assert '<option value="image">Images (2)</option>' in index
    for column in ("Year", "Paper", "Authors", "Venue", "Kind", "Family", "arXiv", "Code"):
        assert f"<th>{column}</th>" in index
    assert 'title="Ada Lovelace, Alan Turing">Ada Lovelace et al.</td>' in index


def test_properties_matrix_rows_carry_their_values(tmp_path):
    page = render(small_repo(tmp_path))["compare/properties.md"]
    assert page.count('data-p-negatives="no"') == 2 and 'data-p-memory="none"' in page
    assert '<select data-property="momentum-encoder">' in page
    assert '<abbr title="Momentum encoder: One branch is an exponential moving average of the other.">EMA</abbr>' in page


def test_implementation_link_opens_the_repository_when_repo_url_is_set(monkeypatch):
    """With a repo_url ($SELFSUP_REPO_URL, which mkdocs.yml reads too) the entry page's implementation
    link opens the file in the repository; without one it points to the code shown on the page."""
    catalog = cat.load_catalog(REPO)
    entry = next(e for e in catalog.entries.values() if e.implementation)
    monkeypatch.delenv(site.REPO_URL_ENV, raising=False)
    plain = render(REPO)[f"papers/{entry.id}.md"]
    assert f"[`{entry.implementation}`](#implementation)" in plain
    assert "/blob/" not in plain
    monkeypatch.setenv(site.REPO_URL_ENV, "https://git.example.org/me/selfsup/")
    linked = render(REPO)[f"papers/{entry.id}.md"]
    url = f"https://git.example.org/me/selfsup/blob/main/{entry.implementation}"
    assert f"[`{entry.implementation}`]({url}) ([below](#implementation))" in linked
