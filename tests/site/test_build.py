"""The built site: a page per entry, complete tables and index, no broken internal link."""

from __future__ import annotations

import html
import json
import re
import unicodedata
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from selfsup import site
from selfsup.site_search import plain_text

BUILD_BUDGET_SECONDS = 120  # the build takes well under a minute for ~300 entries; CI machines vary


class LinkParser(HTMLParser):
    """Collects link targets (href/src) and element ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.rows: list[dict[str, str]] = []  # attributes of <tr> elements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        if tag in {"a", "link"} and "href" in a:
            self.links.append(a["href"])
        if tag in {"script", "img"} and "src" in a:
            self.links.append(a["src"])
        if tag == "tr":
            self.rows.append(a)


def parse(path: Path) -> LinkParser:
    p = LinkParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def url_of(out: Path, page: Path) -> str:
    """The site-relative URL of a built file, as a base for resolving its relative links."""
    return "http://site/" + page.relative_to(out).as_posix()


def target_file(out: Path, url: str) -> Path | None:
    """The file a resolved same-site URL serves, or None for another site."""
    parts = urlsplit(url)
    if parts.netloc != "site":
        return None
    path = unquote(parts.path).lstrip("/")
    if path == "" or path.endswith("/"):
        path += "index.html"
    return out / path


def linked_pages(built, page: Path) -> set[Path]:
    base = url_of(built.out, page)
    found = set()
    for href in parse(page).links:
        f = target_file(built.out, urljoin(base, href))
        if f is not None:
            found.add(f.resolve())
    return found


# ------------------------------------------------------------------------------------------------


def test_build_is_fast(built_site):
    assert built_site.seconds < BUILD_BUDGET_SECONDS


def test_one_page_per_entry(built_site):
    entries = list(built_site.catalog)
    assert entries, "the catalog is empty"
    for e in entries:
        page = built_site.page(e.id)
        assert page.is_file(), f"no page for {e.id}"
        text = page.read_text(encoding="utf-8")
        assert html.escape(e.title, quote=False) in text or e.title in text, f"{e.id}: title missing"
        words = set(re.split(r"[\s\-]+", text.lower()))
        assert e.id in text or set(e.id.split("-")) <= words, f"{e.id}: id not in the search index"
    generated = {p.parent.name for p in (built_site.out / "papers").glob("*/index.html")}
    assert generated == {e.id for e in entries}


def test_properties_table_holds_every_method(built_site):
    page = built_site.out / "compare" / "properties" / "index.html"
    linked = linked_pages(built_site, page)
    methods = [e for e in built_site.catalog if e.kind == "method"]
    missing = [e.id for e in methods if built_site.page(e.id).resolve() not in linked]
    assert not missing, f"methods missing from the properties table: {missing}"
    rows = [r for r in parse(page).rows if "data-p-negatives" in r]
    assert len(rows) == len(methods)


def test_index_lists_every_entry(built_site):
    page = built_site.out / "papers" / "index.html"
    parsed = parse(page)
    row_ids = [r["data-id"] for r in parsed.rows if "data-id" in r]
    assert sorted(row_ids) == sorted(e.id for e in built_site.catalog)
    linked = linked_pages(built_site, page)
    assert all(built_site.page(e.id).resolve() in linked for e in built_site.catalog)
    text = page.read_text(encoding="utf-8")
    assert 'id="paper-count"' in text
    for control in ("family", "kind", "modality", "year-min", "year-max", "implemented"):
        assert f'data-filter="{control}"' in text
    # every option of the kind and modality filters matches some paper (no "Dataset" matching nothing)
    for control, attr in (("kind", "data-kind"), ("modality", "data-modalities")):
        select = re.search(rf'<select data-filter="{control}">(.*?)</select>', text, re.S).group(1)
        options = [v for v in re.findall(r'<option value="([^"]*)"', select) if v]
        values = {w for r in parsed.rows if attr in r for w in r[attr].split()}
        assert options and set(options) <= values, (control, sorted(set(options) - values))


def test_no_broken_internal_links(built_site):
    out = built_site.out
    pages = sorted(out.rglob("*.html"))
    ids_cache: dict[Path, set[str]] = {}
    broken = []
    for page in pages:
        base = url_of(out, page)
        links = parse(page).links
        for href in links:
            if href.startswith(("mailto:", "javascript:", "data:")):
                continue
            url = urljoin(base, href)
            f = target_file(out, url)
            if f is None:
                continue
            if not f.is_file():
                broken.append(f"{page.relative_to(out)}: {href} -> {f.relative_to(out)} does not exist")
                continue
            anchor = urlsplit(url).fragment
            if anchor and f.suffix == ".html":
                if f not in ids_cache:
                    ids_cache[f] = parse(f).ids
                if unquote(anchor) not in ids_cache[f]:
                    broken.append(f"{page.relative_to(out)}: {href}: no #{anchor} in {f.relative_to(out)}")
    assert not broken, f"{len(broken)} broken link(s):\n" + "\n".join(broken[:50])


# Wording for the people who keep the catalog, not for its readers: where an entry's facts came from in
# the project's own sources, and where the machine that ran a benchmark kept its data.
MAINTAINER_WORDING = re.compile(r"reading notes|\.\./shared|shared/data|other jobs", re.I)


def test_no_maintainer_wording_is_published(built_site):
    found = []
    for page in sorted(built_site.out.rglob("*.html")):
        text = html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))
        found += [f"{page.relative_to(built_site.out)}: {m.group(0)!r}" for m in MAINTAINER_WORDING.finditer(text)]
    assert not found, f"{len(found)} places, e.g. " + "; ".join(found[:5])


def test_no_cdn(built_site):
    """Everything the pages load comes from the site itself (no fonts, scripts or styles from a CDN)."""
    offsite = set()
    for page in built_site.out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r'<(?:script|link|img)\b[^>]*(?:src|href)="(https?:)?//([^/"]+)', text):
            offsite.add(f"{page.relative_to(built_site.out)}: {m.group(2)}")
    assert not offsite, sorted(offsite)[:20]
    for asset in (
        "katex/katex.min.js",
        "katex/contrib/auto-render.min.js",
        "cytoscape/cytoscape.min.js",
        "cytoscape-dagre/cytoscape-dagre.min.js",
        "tablesort/tablesort.min.js",
        "katex/LICENSE",
        "cytoscape/LICENSE",
        "cytoscape-dagre/LICENSE",
        "cytoscape-dagre/LICENSE.dagre",
        "tablesort/LICENSE",
        "iframe-worker/shim.js",
        "iframe-worker/LICENSE",
    ):
        assert (built_site.out / "assets" / "vendor" / asset).is_file(), asset


def test_offline_build_is_self_contained(offline_site):
    """The offline build links .html files, inlines its search index and loads no shim from unpkg."""
    out = offline_site.out
    assert (out / "search" / "search_index.js").read_text(encoding="utf-8").startswith("var __index = ")
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "unpkg.com" not in text and "assets/vendor/iframe-worker/shim.js" in text
    assert 'href="papers/index.html"' in text


def _search_docs(built_site) -> list[dict]:
    return json.loads((built_site.out / "search" / "search_index.json").read_text(encoding="utf-8"))["docs"]


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(s)).strip()


def test_search_index_covers_entries(built_site):
    by_location: dict[str, str] = {}
    for doc in _search_docs(built_site):
        page = doc["location"].split("#")[0]
        words = " ".join([doc["title"], doc["text"], *doc.get("tags", [])])
        by_location[page] = by_location.get(page, "") + " " + words
    for e in built_site.catalog:
        text = _norm(by_location.get(f"papers/{e.id}/", ""))
        assert _norm(plain_text(e.title)) in text, f"{e.id}: title not in the search index"
        assert _norm(e.key_idea)[:60] in text, f"{e.id}: key idea not in the search index"
        words = set(re.split(r"[\s\-]+", text.lower()))
        assert e.id in text or set(e.id.split("-")) <= words, f"{e.id}: id not in the search index"


def test_search_snippet_is_the_summary_and_titles_are_plain(built_site):
    """The page's first search document (its result and snippet) is the title and the summary, without the
    metadata list; titles with math are plain text there and in <title>."""
    docs = {d["location"]: d for d in _search_docs(built_site)}
    for e in built_site.catalog:
        doc = docs[f"papers/{e.id}/"]
        text = _norm(re.sub(r"<[^>]+>", " ", doc["text"]))
        assert text.startswith(_norm(e.summary)[:50]), f"{e.id}: the snippet is {text[:80]!r}"
        assert "Catalog id" not in text, e.id
        heading = unicodedata.normalize("NFKC", _norm(doc["title"])).lower()
        assert e.name is None or e.name.lower() in heading, f"{e.id}: {doc['title']!r}"
        assert not re.search(r"\$|\\\(", doc["title"]), f"{e.id}: {doc['title']!r}"
        page = built_site.page(e.id).read_text(encoding="utf-8")
        title = html.unescape(re.search(r"<title>(.*?)</title>", page, re.S).group(1))
        assert not re.search(r"\$|\\\(", title), f"{e.id}: <title>{title}</title>"
    if "rizhko-2025-astrom3" in built_site.catalog.entries:
        assert docs["papers/rizhko-2025-astrom3/"]["title"].startswith("AstroM³")


def test_listing_pages_leave_search_to_the_entries(built_site):
    """Index, matrix and family listings are out of the index: a paper's words find the paper's page."""
    for doc in _search_docs(built_site):
        if doc["location"].startswith(("papers/#", "compare/properties/")) or doc["location"] == "papers/":
            assert "SwAV" not in doc["text"], doc["location"]
def test_implemented_methods_embed_their_source(built_site):
    implemented = [e for e in built_site.catalog if e.implementation]
    if not implemented:
        pytest.skip("no catalog entry has an implementation yet")
    for e in implemented:
        text = built_site.page(e.id).read_text(encoding="utf-8")
        assert 'id="implementation"' in text
        assert f"selfsup train {e.id}" in text
        source = (built_site.root / e.implementation).read_text(encoding="utf-8")
        # every identifier of the file's last def/class line appears in the highlighted code
        name = re.findall(r"^(?:def|class) (\w+)", source, re.M)
        assert "--8&lt;--" not in text and "--8<--" not in text, f"{e.id}: snippet not resolved"
        for n in name:
            assert n in text, f"{e.id}: {n} from {e.implementation} not embedded"


def test_math_is_left_for_katex(built_site):
    for e in built_site.catalog:
        if e.loss_latex:
            text = built_site.page(e.id).read_text(encoding="utf-8")
            assert 'class="arithmatex"' in text, e.id


def test_api_reference_lists_existing_modules(built_site):
    text = (built_site.out / "api" / "index.html").read_text(encoding="utf-8")
    code_root = site.config_file(built_site.root).parent
    modules = [m for m in site.API_MODULES if site.module_exists(code_root, m)]
    assert "selfsup.catalog" in modules
    for m in modules:
        assert f'id="{m}"' in text, m


SPHINX_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj|ref|py:\w+):`?")
RAW_REFERENCE = re.compile(r"\[[^\]\n]{1,120}\]\[[^\]\n]*\]")  # [title][id] left as text: unresolved
MARKDOWN_FILE = re.compile(r"(?<![\w/.-])(?:[\w.-]+/)*[\w.-]+\.md\b")


def test_api_reference_has_no_raw_roles_and_no_dangling_references(built_site):
    """Docstrings cross-reference with Markdown that mkdocstrings resolves: no Sphinx role shows raw, every
    reference became a link to an object documented on the page, and every Markdown file named exists."""
    page = built_site.out / "api" / "index.html"
    raw = page.read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", "", raw))
    assert not SPHINX_ROLE.findall(text), sorted({m.group(0) for m in SPHINX_ROLE.finditer(text)})
    assert "<autoref" not in raw, "mkdocs-autorefs left references unresolved"
    assert not RAW_REFERENCE.findall(text), RAW_REFERENCE.findall(text)[:5]
    ids = parse(page).ids
    internal = re.findall(r'<a class="autorefs autorefs-internal"[^>]*href="([^"]*)"', raw)
    assert internal, "the docstrings cross-reference nothing"
    for href in internal:
        target = urljoin(url_of(built_site.out, page), href)
        path, _, anchor = target.partition("#")
        assert target_file(built_site.out, path) == page or target_file(built_site.out, path).is_file(), href
        assert target_file(built_site.out, path) != page or anchor in ids, href
    repo = site.config_file(built_site.root).parent
    for name in set(MARKDOWN_FILE.findall(text)):
        exists = (repo / name).is_file() or (repo / "site" / name).is_file()
        built = built_site.out / name.removesuffix(".md")  # a generated page (papers/simclr.md)
        assert exists or (built / "index.html").is_file() or built.with_suffix(".html").is_file(), name


def test_api_reference_lists_the_fields_of_pydantic_models(built_site):
    text = html.unescape(re.sub(r"<[^>]+>", " ", (built_site.out / "api" / "index.html").read_text(encoding="utf-8")))
    start = text.index("One paper.")  # selfsup.catalog.Entry
    fields = re.sub(r"\s+", " ", text[start : start + 4000])
    assert "Fields:" in fields
    for name in ("id", "title", "authors", "year", "summary"):
        assert re.search(rf"\b{name} \( ", fields), name


# ------------------------------------------------------------------------------------------------
# Hostile catalog strings, and the output directory the build may empty.


@pytest.fixture(scope="module")
def hostile_site(hostile_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site of :data:`conftest.HOSTILE_ENTRY`, built over what looks like a previous build."""
    pytest.importorskip("mkdocs", reason="the site needs the 'site' extra: pip install -e '.[site]'")
    out = tmp_path_factory.mktemp("hostile-site")
    (out / site.SITE_MARKER).write_text("")
    (out / "stale.html").write_text("from the previous build")
    assert site.build(root=hostile_root, out_dir=out, strict=True, offline=False) == 0
    return out


def test_catalog_strings_reach_the_html_escaped(hostile_site, hazards):
    pages = {p.relative_to(hostile_site): p.read_text(encoding="utf-8") for p in hostile_site.rglob("*.html")}
    assert not {page: hazards(text) for page, text in pages.items() if hazards(text)}
    text = (hostile_site / "papers" / "hostile" / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown as written
    assert 'class="arithmatex"' in text


def test_rebuild_empties_a_marked_directory_and_keeps_the_marker(hostile_site):
    assert not (hostile_site / "stale.html").exists()
    assert (hostile_site / site.SITE_MARKER).is_file()


@pytest.fixture
def refused(monkeypatch, capsys):
    """Asserts that building into a directory is refused with a one-line error, before mkdocs starts."""
    # Were the guard to fail, mkdocs would empty the directory: make sure it never starts here.
    monkeypatch.setattr(site, "_mkdocs", lambda *args, **kwargs: pytest.fail("mkdocs was started"))

    def check(root: Path, out: Path, why: str) -> None:
        assert site.build(root=root, out_dir=out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out.resolve()}: " in err and why in err, err

    return check


def test_build_refuses_a_directory_it_does_not_own(tmp_path, hostile_root, refused):
    (tmp_path / "x").write_text("the user's")
    refused(hostile_root, tmp_path, "is not empty and holds no .selfsup-site file")
    refused(hostile_root, tmp_path / "x", "is a file, not a directory")
    assert (tmp_path / "x").read_text() == "the user's"
    for repo in (hostile_root, hostile_root.parent, site.cat.ROOT):
        refused(hostile_root, repo, "is or contains the repository")
    for data in (hostile_root / "catalog", hostile_root / "taxonomy" / "new", site.cat.ROOT / "catalog"):
        refused(hostile_root, data, "is or is inside")
    assert not (hostile_root / "taxonomy" / "new").exists()


# ------------------------------------------------------------------------------------------------
# Lineage


def lineage_data(built_site) -> dict:
    text = (built_site.out / "assets" / "generated" / "lineage-data.js").read_text(encoding="utf-8")
    prefix = "window.SELFSUP_LINEAGE = "
    assert text.startswith(prefix)
    return json.loads(text[len(prefix):].rstrip().rstrip(";"))


def test_lineage_data_matches_the_catalog(built_site):
    """Every builds_on link is an edge, every node is named (not its id) and its URL opens its page."""
    data = lineage_data(built_site)
    catalog = built_site.catalog
    want = sorted([p, e.id] for e in catalog for p in e.builds_on)
    assert sorted(data["edges"]) == want
    ids = {n["id"] for n in data["nodes"]}
    assert ids == {i for edge in want for i in edge}
    base = url_of(built_site.out, built_site.out / "lineage" / "index.html")
    for n in data["nodes"]:
        entry = catalog.entries[n["id"]]
        assert n["name"] == site.display_name(entry) and n["year"] == entry.year
        assert target_file(built_site.out, urljoin(base, n["url"])) == built_site.page(n["id"])
    fams = {f["id"] for f in data["families"]}
    assert {n["family"] for n in data["nodes"]} <= fams


def test_simclr_has_its_predecessors(built_site):
    assert {"instdisc", "cpc"} <= set(built_site.catalog.entries["simclr"].builds_on)


def test_heavy_scripts_only_where_used(built_site):
    """No page loads Mermaid or Cytoscape by a script tag: lineage.js loads Cytoscape on the lineage page."""
    for page in built_site.out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r'class="mermaid"|mermaid(\.min)?\.js', text), page
        assert not re.search(r"<script[^>]+cytoscape", text), page
    lineage = (built_site.out / "lineage" / "index.html").read_text(encoding="utf-8")
    assert 'id="lineage-graph"' in lineage and "lineage.js" in lineage


def test_entry_pages_show_their_local_lineage(built_site):
    page = built_site.page("simclr-v2")
    text = page.read_text(encoding="utf-8")
    local = re.search(r'<div class="lineage-local".*?</div>', text, re.S).group(0)
    for parent in ("simclr", "moco"):
        assert f'href="../{parent}/"' in local, parent
    assert 'class="lineage-node lineage-centre"' in local
    assert "marker-end" in local
    # an entry without links has no local graph
    lonely = next(e.id for e in built_site.catalog if not e.builds_on and not built_site.catalog.built_upon_by(e.id))
    assert 'class="lineage-local"' not in built_site.page(lonely).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Reported results


def test_reported_rows_say_data_and_labels(built_site):
    """Every reported result is a row; only label-free ImageNet-1k rows are marked comparable."""
    text = (built_site.out / "compare" / "reported" / "index.html").read_text(encoding="utf-8")
    rows = re.findall(r'<tr data-comparable="([01])">(.*?)</tr>', text, re.S)
    results = [(e, r) for e in built_site.catalog for r in e.results]
    assert len(rows) == len(results)
    names = {d["id"]: d["name"] for d in built_site.catalog.taxonomy.pretrain_data}
    want = sum(
        r.pretrain_data == "imagenet-1k" and not r.pretrain_labels and e.subfamily != "supervised"
        for e, r in results
    )
    assert sum(flag == "1" for flag, _ in rows) == want
    for flag, row in rows:
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        data, labels = cells[-3], cells[-2]
        assert labels in {"yes", "no"} and (data == "?" or data in names.values())
        if flag == "1":
            assert data == names["imagenet-1k"] and labels == "no"
    supervised = [e.id for e in built_site.catalog if e.subfamily == "supervised" and e.results]
    for entry_id in supervised:  # e.g. SupCon: marked as using labels, never in the default view
        for flag, row in rows:
            if f'href="../../papers/{entry_id}/"' in row:
                assert flag == "0" and "<td>yes</td>" in row
