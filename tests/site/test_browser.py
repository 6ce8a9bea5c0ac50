"""The built site in a real headless Chromium: search, index filters, code and math, no CDN.

Needs Debian's Chromium (``apt-get install chromium``) and the python ``playwright`` package; the tests
skip with the reason otherwise. Screenshots go to test-artifacts/ (git-ignored) for a human to look at.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TIMEOUT_MS = 20_000
ROW_HEIGHT_PX = 45  # the paper index, per paper (was about 70 before it became compact)

# CI sets SELFSUP_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip.
REQUIRED = os.environ.get("SELFSUP_REQUIRE_BROWSER", "") not in {"", "0"}


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (SELFSUP_REQUIRE_BROWSER is set)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not Path(CHROMIUM).is_file():
    _unavailable(f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install chromium)")
try:
    from playwright import sync_api
except ImportError:
    _unavailable("the python package 'playwright' is missing: pip install -e '.[dev]'")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def base_url(built_site):
    handler = functools.partial(_QuietHandler, directory=str(built_site.out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


class Page:
    """A browser tab that records script errors and every request that leaves the local server."""

    def __init__(self, browser, base_url: str):
        self.base_url = base_url
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.offsite: list[str] = []
        self.errors: list[str] = []

        def route(r):
            host = urlsplit(r.request.url).hostname
            if r.request.url.startswith(("http:", "https:")) and host not in {"127.0.0.1", "localhost"}:
                self.offsite.append(r.request.url)
                return r.abort()
            return r.continue_()

        self.context.route("**/*", route)
        self.tab = self.context.new_page()
        self.tab.set_default_timeout(TIMEOUT_MS)
        self.tab.on("pageerror", lambda e: self.errors.append(str(e)))
        self.tab.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def open(self, path: str) -> None:
        self.tab.goto(self.base_url + path, wait_until="load")

    def assert_clean(self) -> None:
        assert not self.offsite, f"requests left the site (CDN?): {self.offsite}"
        assert not self.errors, f"errors in the browser console: {self.errors}"


@pytest.fixture
def page(browser, base_url):
    p = Page(browser, base_url)
    yield p
    p.context.close()


# ------------------------------------------------------------------------------------------------


def _search(page: Page, query: str) -> list[str]:
    tab = page.tab
    tab.click("input.md-search__input")
    tab.fill("input.md-search__input", "")
    tab.keyboard.type(query, delay=15)
    tab.wait_for_selector(".md-search-result__item", timeout=TIMEOUT_MS)
    return tab.eval_on_selector_all(".md-search-result__item > a", "els => els.map(e => e.href)")


@pytest.mark.parametrize(
    "entry_id, query",
    [
        ("barlow-twins", "redundancy reduction"),  # title words
        ("simclr", "simclr"),  # method name
        ("byol", "slowly moving average"),  # key idea
    ],
)
def test_search_finds_entries(page, built_site, artifacts, entry_id, query):
    if entry_id not in built_site.catalog.entries:
        pytest.skip(f"{entry_id} is not in the catalog")
    page.open("")
    hrefs = _search(page, query)
    wanted = f"/papers/{entry_id}/"
    assert any(urlsplit(h).path.endswith(wanted) for h in hrefs[:10]), f"{query!r}: {hrefs[:10]}"
    page.tab.screenshot(path=str(artifacts / f"search-{entry_id}.png"))
    page.assert_clean()


def _result_pages(page: Page, query: str) -> list[str]:
    """The pages a search returns, best first (a result groups a page with its sections), as site paths."""
    tab = page.tab
    tab.click("input.md-search__input")
    tab.fill("input.md-search__input", "")
    tab.keyboard.type(query, delay=15)
    tab.wait_for_selector(".md-search-result__item", timeout=TIMEOUT_MS)
    tab.wait_for_timeout(600)  # the results of the last keystroke
    hrefs = tab.eval_on_selector_all(
        ".md-search-result__item", "els => els.map(li => li.querySelector('a').href)"
    )
    base = urlsplit(page.base_url).path
    return [urlsplit(h).path[len(base) :] for h in hrefs]


@pytest.mark.parametrize(
    "query, wanted, mechanism",
    [
        ("swav", {"swav"}, False),  # a method name the paper's title lacks
        ("MoCo", {"moco"}, False),
        ("masked image modelling", {"mae", "simmim", "beit"}, True),  # British spelling, a synonym
        ("MIM", {"mae", "simmim", "beit"}, True),
        ("self-distillation", {"dino", "byol", "ibot", "dinov2"}, True),
        ("negative-free", {"byol", "simsiam", "barlow-twins", "vicreg", "dino"}, True),
    ],
)
def test_search_puts_the_method_page_in_the_top_three(page, built_site, artifacts, query, wanted, mechanism):
    present = {i for i in wanted if i in built_site.catalog.entries}
    if not present:
        pytest.skip(f"none of {sorted(wanted)} is in the catalog")
    page.open("")
    pages = _result_pages(page, query)
    top = pages[:3]
    assert {f"papers/{i}/" for i in present} & set(top), (
        f"{query!r}: top three {top}, wanted one of {present}"
    )
    if mechanism:  # method pages above the family pages that name the mechanism
        assert all(p.startswith("papers/") and p != "papers/" for p in top), f"{query!r}: {top}"
    # the keywords rank the results but are not shown in them
    assert page.tab.locator(".md-search-result .md-tags:visible").count() == 0
    slug = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-")
    page.tab.screenshot(path=str(artifacts / f"search-rank-{slug}.png"))
    page.assert_clean()


def _count(page: Page) -> int:
    return int(page.tab.text_content("#paper-count"))


def _visible_rows(page: Page) -> int:
    return page.tab.locator("#paper-index tbody tr:visible").count()


def test_index_filters_change_the_count(page, built_site, artifacts):
    entries = list(built_site.catalog)
    page.open("papers/")
    total = _count(page)
    assert total == len(entries) == _visible_rows(page)

    family = max(built_site.catalog.taxonomy.family_ids, key=lambda f: sum(e.family == f for e in entries))
    expected = [e for e in entries if e.family == family or family in e.also]
    page.tab.select_option('[data-filter="family"]', family)
    assert _count(page) == len(expected) == _visible_rows(page)
    assert _count(page) < total

    lo, hi = 2020, 2021
    page.tab.fill('[data-filter="year-min"]', str(lo))
    page.tab.fill('[data-filter="year-max"]', str(hi))
    expected = [e for e in expected if lo <= e.year <= hi]
    assert _count(page) == len(expected) == _visible_rows(page)

    page.tab.select_option('[data-filter="kind"]', "method")
    expected = [e for e in expected if e.kind == "method"]
    assert _count(page) == len(expected)
    page.tab.screenshot(path=str(artifacts / "index-filtered.png"), full_page=False)

    page.tab.check('[data-filter="implemented"]')
    assert _count(page) == len([e for e in expected if e.implementation])

    page.tab.click("[data-filter-reset]")
    page.tab.wait_for_function(f"document.getElementById('paper-count').textContent === '{total}'")
    assert _visible_rows(page) == total

    page.tab.fill('[data-filter="text"]', "contrastive")
    expected = [e for e in entries if "contrastive" in " ".join([e.id, e.title, *e.authors, *e.tags]).lower()]
    assert _count(page) == len(expected)
    page.assert_clean()


def test_index_filter_from_query_string_and_sorting(page, built_site):
    entries = list(built_site.catalog)
    page.open("papers/?kind=method")
    assert _count(page) == sum(e.kind == "method" for e in entries)
    page.tab.click("#paper-index thead th:first-child")
    years = [
        int(y)
        for y in page.tab.eval_on_selector_all(
            "#paper-index tbody tr:not([hidden]) td:first-child", "els => els.map(e => e.textContent)"
        )
    ]
    assert years in (sorted(years), sorted(years, reverse=True))
    page.assert_clean()


def test_implemented_method_page_has_code_and_math(page, built_site, artifacts):
    implemented = [e for e in built_site.catalog.sorted() if e.implementation and e.loss_latex]
    if not implemented:
        pytest.skip("no catalog entry has an implementation yet")
    e = implemented[0]
    # from the index, through mkdocs-material's instant navigation (scripts must re-run on document$)
    page.open("papers/")
    tab = page.tab
    tab.click(f"#paper-index a[href$='/papers/{e.id}/']")
    tab.wait_for_url(f"**/papers/{e.id}/")
    tab.wait_for_selector(".katex")
    assert tab.locator(".katex-error").count() == 0
    block = tab.locator("div.highlight", has=tab.locator("span.filename", has_text=e.implementation))
    assert block.count() == 1, f"no code block titled {e.implementation}"
    shown = block.locator("td.code code, pre > code").first.inner_text()
    source = (built_site.root / e.implementation).read_text(encoding="utf-8")
    missing = [line for line in source.splitlines() if line.strip() and line.strip() not in shown]
    assert not missing, f"lines of {e.implementation} not shown: {missing[:5]}"
    copy = block.locator('button[data-md-type="copy"], button.md-clipboard')  # material 9.8 / older
    assert copy.count() == 1, "no copy button on the source"
    assert f"selfsup train {e.id}" in tab.inner_text("article")
    tab.screenshot(path=str(artifacts / f"method-{e.id}.png"), full_page=True)
    page.assert_clean()


def test_every_loss_renders_with_katex(page, built_site):
    """Each entry's loss_latex goes through the vendored KaTeX without a parse error."""
    losses = {e.id: e.loss_latex for e in built_site.catalog if e.loss_latex}
    page.open("")
    errors = page.tab.evaluate(
        """losses => {
            const bad = {};
            for (const [id, tex] of Object.entries(losses)) {
                try { katex.renderToString(tex, {displayMode: true, throwOnError: true}); }
                catch (err) { bad[id] = String(err.message || err); }
            }
            return bad;
        }""",
        losses,
    )
    assert not errors, "KaTeX cannot render:\n" + "\n".join(f"{k}: {v}" for k, v in errors.items())


def _lineage(page) -> None:
    page.tab.wait_for_selector('#lineage-graph[data-state="ready"]')


def _shown(page) -> list[dict]:
    return page.tab.evaluate(
        """() => document.getElementById("lineage-graph").cy.nodes()
            .filter(n => n.style("display") === "element").map(n => n.data())"""
    )


def test_lineage_graph_renders_filters_and_opens_a_page(page, built_site, artifacts):
    page.open("lineage/")
    _lineage(page)
    box = page.tab.locator("#lineage-graph").bounding_box()
    assert box["width"] > 800 and box["height"] > 400
    assert page.tab.locator("#lineage-graph canvas").count() > 0
    everything = _shown(page)
    linked = {i for e in built_site.catalog for p in e.builds_on for i in (p, e.id)}
    assert {n["id"] for n in everything} == linked
    assert page.tab.inner_text("#lineage-count") == str(len(linked))
    page.tab.screenshot(path=str(artifacts / "lineage.png"))

    # families: unchecking one hides its papers; years: a range keeps the papers inside it
    page.tab.uncheck('#lineage-filters input[name="family"][value="contrastive"]')
    shown = _shown(page)
    assert shown and len(shown) < len(everything) and all(n["family"] != "contrastive" for n in shown)
    assert page.tab.inner_text("#lineage-count") == str(len(shown))
    page.tab.fill('#lineage-filters input[name="from"]', "2021")
    page.tab.dispatch_event('#lineage-filters input[name="from"]', "change")
    assert all(n["year"] >= 2021 and n["family"] != "contrastive" for n in _shown(page))
    page.tab.select_option('#lineage-filters select[name="modality"]', "video")
    assert all("video" in n["modalities"] for n in _shown(page))
    page.tab.click('#lineage-filters button[type="reset"]')
    page.tab.wait_for_function(f'document.getElementById("lineage-count").textContent === "{len(linked)}"')

    # the layered layout lays out the same papers
    page.tab.select_option('#lineage-filters select[name="layout"]', "dagre")
    assert len(_shown(page)) == len(everything)

    # find a paper, then click it: its page opens
    page.tab.fill('#lineage-filters input[name="find"]', "SimCLR")
    focused = page.tab.evaluate('document.getElementById("lineage-graph").cy.$(".focus").map(n => n.id())')
    assert focused == ["simclr"]
    page.tab.screenshot(path=str(artifacts / "lineage-simclr.png"))
    pos = page.tab.evaluate('document.getElementById("lineage-graph").cy.getElementById("simclr").renderedPosition()')
    box = page.tab.locator("#lineage-graph").bounding_box()
    page.tab.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
    page.tab.wait_for_url("**/papers/simclr/")
    page.assert_clean()


def test_lineage_focus_from_the_url(page, built_site):
    page.open("lineage/?focus=moco&family=contrastive,distillation")
    _lineage(page)
    assert page.tab.evaluate('document.getElementById("lineage-graph").cy.$(".focus").map(n => n.id())') == ["moco"]
    assert {n["family"] for n in _shown(page)} <= {"contrastive", "distillation"}
    page.assert_clean()


def test_entry_page_local_lineage_links_work(page, built_site, artifacts):
    page.open("papers/simclr-v2/")
    graph = page.tab.locator(".lineage-local")
    graph.scroll_into_view_if_needed()
    box = graph.bounding_box()
    assert box and box["width"] > 200 and box["height"] >= 30
    graph.screenshot(path=str(artifacts / "local-lineage.png"))
    page.tab.click('.lineage-local a.lineage-node[href$="/simclr/"]')  # instant navigation makes it absolute
    page.tab.wait_for_url("**/papers/simclr/")
    page.tab.wait_for_selector(".lineage-local .lineage-centre")
    page.assert_clean()


def test_taxonomy_tree_links_every_family(page, built_site):
    page.open("taxonomy/")
    links = page.tab.locator(".taxonomy-tree a")
    assert links.count() >= len(built_site.catalog.taxonomy.families)
    page.assert_clean()


PAGE_WEIGHT_LIMIT = 1_500_000  # bytes a cold load of an entry page may fetch (uncompressed)


def test_cold_entry_page_load_is_light(page, built_site, artifacts):
    """Everything a first visit to an entry page fetches (HTML, styles, scripts, fonts, the search index),
    summed over the responses' bodies: for SimCLR's page and for the heaviest entry page."""
    heaviest = max(built_site.catalog, key=lambda e: built_site.page(e.id).stat().st_size).id
    weights = {}
    for entry_id in dict.fromkeys(["simclr", heaviest]):
        context = page.context.browser.new_context()
        tab = context.new_page()
        sizes: dict[str, int] = {}
        tab.on("response", lambda r, sizes=sizes: sizes.__setitem__(r.url, len(r.body()) if r.ok else 0))
        tab.goto(f"{page.base_url}papers/{entry_id}/", wait_until="networkidle")
        tab.wait_for_timeout(500)
        weights[entry_id] = sum(sizes.values())
        context.close()
    (artifacts / "page-weight.txt").write_text("".join(f"{k}: {v} bytes\n" for k, v in weights.items()))
    assert all(w < PAGE_WEIGHT_LIMIT for w in weights.values()), weights


def test_pages_load_without_errors(page, built_site, artifacts):
    for path in [
        "",
        "families/",
        "compare/properties/",
        "compare/reported/",
        "compare/measured/",
        "timeline/",
        "methods/",
        "api/",
        "method-interface/",
    ]:
        page.open(path)
        page.tab.wait_for_selector("article h1")
    page.open("")
    page.tab.screenshot(path=str(artifacts / "home.png"), full_page=True)
    page.assert_clean()


def test_index_every_kind_option_matches_papers(page, built_site):
    page.open("papers/")
    options = page.tab.eval_on_selector_all('[data-filter="kind"] option', "els => els.map(e => e.value)")
    for kind in [o for o in options if o]:
        page.tab.select_option('[data-filter="kind"]', kind)
        assert _count(page) == sum(e.kind == kind for e in built_site.catalog) > 0, kind
    page.assert_clean()


def test_index_is_compact_with_authors_venue_arxiv_and_code(page, built_site, artifacts):
    page.open("papers/")
    tab = page.tab
    headers = tab.eval_on_selector_all("#paper-index thead th", "els => els.map(e => e.textContent.trim())")
    assert {"Authors", "Venue", "arXiv", "Code"} <= set(headers), headers
    box = tab.locator("#paper-index").bounding_box()
    rows = len(list(built_site.catalog))
    assert box["height"] / rows < ROW_HEIGHT_PX, f"{box['height'] / rows:.0f} px per paper"
    assert tab.locator("#paper-index a[href^='https://arxiv.org/abs/']").count() == sum(
        bool(e.arxiv) for e in built_site.catalog
    )
    tab.screenshot(path=str(artifacts / "index.png"))
    page.assert_clean()


def test_key_value_tables_are_not_sortable(page, built_site):
    e = next(e for e in built_site.catalog.sorted() if e.kind == "method" and e.properties)
    page.open(f"papers/{e.id}/")
    page.tab.wait_for_selector(".selfsup-static table")
    assert page.tab.locator(".selfsup-static table th[role='columnheader']").count() == 0
    assert page.tab.locator(".selfsup-static table[data-sortable]").count() == 0
    page.open("")
    assert page.tab.locator(".selfsup-counts table[data-sortable]").count() == 0
    page.open("papers/")
    assert page.tab.locator("#paper-index[data-sortable='ready']").count() == 1  # list tables still sort
    page.assert_clean()


def test_bibtex_stays_in_its_column(page, built_site, artifacts):
    e = max(built_site.catalog, key=lambda e: len(e.title) + len(", ".join(e.authors)))
    page.open(f"papers/{e.id}/")
    code = page.tab.locator("h2#cite + .highlight pre > code")
    sizes = code.evaluate("c => [c.scrollWidth, c.clientWidth]")
    assert sizes[0] <= sizes[1] + 1, f"the BibTeX of {e.id} overflows: {sizes}"
    article = page.tab.locator("article").bounding_box()
    block = page.tab.locator("h2#cite + .highlight").bounding_box()
    assert block["x"] + block["width"] <= article["x"] + article["width"] + 1
    code.scroll_into_view_if_needed()
    page.tab.screenshot(path=str(artifacts / "bibtex.png"))
    page.assert_clean()


def _visible_methods(page: Page) -> list[str]:
    return page.tab.eval_on_selector_all(
        "#property-matrix tbody tr:not([hidden]) td:first-child", "els => els.map(e => e.textContent.trim())"
    )


def test_property_filters(page, built_site, artifacts):
    from selfsup.site import display_name

    every = [e for e in built_site.catalog if e.kind == "method"]
    methods = [e for e in every if e.properties.get("uses_labels") is False]  # labelled ones hidden at first
    assert 0 < len(methods) < len(every)
    page.open("compare/properties/")
    tab = page.tab
    assert int(tab.text_content("#method-count")) == len(methods) == len(_visible_methods(page))
    assert "NCA" not in _visible_methods(page)

    tab.select_option('[data-property="negatives"]', "no")
    tab.select_option('[data-property="momentum-encoder"]', "no")
    expected = [
        e
        for e in methods
        if e.properties.get("negatives") is False and e.properties.get("momentum_encoder") is False
    ]
    assert 0 < len(expected) < len(methods)
    assert int(tab.text_content("#method-count")) == len(expected)
    assert sorted(_visible_methods(page)) == sorted(display_name(e) for e in expected)
    tab.screenshot(path=str(artifacts / "properties-filtered.png"))

    family = "distillation" if any(e.family == "distillation" for e in expected) else expected[0].family
    tab.select_option('[data-filter="family"]', family)
    assert int(tab.text_content("#method-count")) == sum(e.family == family for e in expected)

    tab.click("#property-filters [data-filter-reset]")
    tab.wait_for_function(f"document.getElementById('method-count').textContent === '{len(methods)}'")
    assert len(_visible_methods(page)) == len(methods)

    page.open("compare/properties/?negatives=no&momentum_encoder=no")
    assert int(tab.text_content("#method-count")) == len(expected)
    page.open("compare/properties/?uses-labels=")
    assert int(tab.text_content("#method-count")) == len(every)
    assert "NCA" in _visible_methods(page)
    page.assert_clean()


def test_property_matrix_keeps_header_and_method_column_in_view(page, built_site, artifacts):
    page.open("compare/properties/")
    tab = page.tab
    n_props = len(built_site.catalog.taxonomy.properties)
    assert tab.locator("#property-matrix thead th abbr[title]").count() == n_props  # short headers, hover
    geometry = tab.locator("#property-matrix").evaluate(
        """t => {
            t.scrollTop = 600; t.scrollLeft = 500;
            const box = t.getBoundingClientRect();
            const th = t.tHead.rows[0].cells[4].getBoundingClientRect();
            const rows = Array.from(t.tBodies[0].rows).filter(r => r.getBoundingClientRect().bottom > th.bottom);
            const first = rows[0].cells[0].getBoundingClientRect();
            return {scrollTop: t.scrollTop, scrollLeft: t.scrollLeft, top: box.top, left: box.left,
                    thTop: th.top, tdLeft: first.left};
        }"""
    )
    assert geometry["scrollTop"] > 0, "the matrix does not scroll within its box"
    assert abs(geometry["thTop"] - geometry["top"]) <= 2, geometry  # header row stays at the top
    if geometry["scrollLeft"] > 0:
        assert abs(geometry["tdLeft"] - geometry["left"]) <= 2, geometry  # method column stays at the left
    tab.screenshot(path=str(artifacts / "properties-scrolled.png"))
    page.assert_clean()


# ------------------------------------------------------------------------------------------------
# The offline build, opened from file:// (no server): links open pages, search works.


def _is_page(page: Page) -> bool:
    """Whether the tab shows a page of the site (not a directory listing or an error page)."""
    return page.tab.locator("article.md-content__inner h1").count() > 0


def test_offline_build_reads_from_file_urls(browser, offline_site, artifacts):
    out = offline_site.out
    assert (out / "index.html").is_file() and (out / "search" / "search_index.js").is_file()
    entry = next((i for i in ("simclr", "byol", "moco") if i in offline_site.catalog.entries), None)
    if entry is None:
        entry = sorted(offline_site.catalog.entries)[0]
    page = Page(browser, out.resolve().as_uri() + "/")
    try:
        page.open("index.html")
        assert _is_page(page), page.tab.url
        # a link of the home page opens a page, not a directory listing
        href = page.tab.eval_on_selector(
            "article a[href$='.html']:not([href^='http'])", "a => a.getAttribute('href')"
        )
        page.tab.click(f"article a[href='{href}']")
        page.tab.wait_for_load_state("load")
        assert page.tab.url.startswith("file://") and page.tab.url.split("#")[0].endswith(".html"), page.tab.url
        assert _is_page(page), page.tab.url

        page.open(f"papers/{entry}.html")
        assert _is_page(page) and offline_site.catalog.entries[entry].name in page.tab.inner_text("h1")
        # from the entry page to another page of the site (its family, a predecessor, the index)
        links = page.tab.eval_on_selector_all(
            "article a[href$='.html']",
            "els => els.map(a => a.getAttribute('href')).filter(h => !h.startsWith('http'))",
        )
        assert links, "the entry page links to no other page"
        page.tab.click(f"article a[href='{links[0]}']")
        page.tab.wait_for_load_state("load")
        assert page.tab.url.split("#")[0].endswith(".html") and _is_page(page), page.tab.url
        assert page.tab.url.split("#")[0] != (out / "papers" / f"{entry}.html").as_uri()

        # search works without a server (the index inlined as a script, the worker shimmed)
        hrefs = _search(page, offline_site.catalog.entries[entry].name)
        assert any(urlsplit(h).path.endswith(f"/papers/{entry}.html") for h in hrefs[:10]), hrefs[:10]
        page.tab.screenshot(path=str(artifacts / "offline-search.png"))
        page.assert_clean()
    finally:
        page.context.close()


def test_reported_results_default_to_comparable_rows(page, built_site, artifacts):
    results = [(e, r) for e in built_site.catalog for r in e.results]
    page.open("compare/reported/")
    rows = page.tab.locator("tr[data-comparable]")
    assert rows.count() == len(results)
    comparable = page.tab.locator('tr[data-comparable="1"]').count()
    assert page.tab.locator("tr[data-comparable]:visible").count() == comparable
    assert page.tab.inner_text("#reported-shown") == str(comparable)
    # the tables fit their column: nothing hidden to the right
    for table in page.tab.locator(".reported-table table").all()[:3]:
        assert table.evaluate("t => t.scrollWidth <= t.parentElement.clientWidth + 1")
    page.tab.screenshot(path=str(artifacts / "reported.png"), full_page=True)
    page.tab.uncheck("#reported-comparable")
    assert page.tab.locator("tr[data-comparable]:visible").count() == len(results)
    page.open("compare/reported/?all=1")
    assert page.tab.locator("tr[data-comparable]:visible").count() == len(results)
    page.assert_clean()


def test_paper_index_exports_the_filtered_list(page, built_site, artifacts):
    import csv
    import io
    import json

    page.open("papers/?family=contrastive&implemented=1")
    page.tab.wait_for_selector("#paper-index")
    shown = page.tab.evaluate(
        'Array.from(document.querySelectorAll("#paper-index tbody tr")).filter(r => !r.hidden).map(r => r.dataset.id)'
    )
    want = [e.id for e in built_site.catalog if e.implementation and "contrastive" in [e.family, *e.also]]
    assert shown and sorted(shown) == sorted(want)
    rows = list(csv.DictReader(io.StringIO(page.tab.evaluate('selfsupExport("csv")'))))
    assert [r["id"] for r in rows] == shown
    assert all(r["title"] and r["year"].isdigit() for r in rows)
    records = json.loads(page.tab.evaluate('selfsupExport("json")'))
    assert [r["id"] for r in records] == shown
    entry = built_site.catalog.entries[shown[0]]
    assert records[0]["authors"] == entry.authors and records[0]["arxiv"] == entry.arxiv
    bib = page.tab.evaluate('selfsupExport("bib")')
    assert bib.count("\n@") + bib.startswith("@") == len(shown)
    with page.tab.expect_download() as download:
        page.tab.click('#paper-export button[data-export="bib"]')
    assert download.value.suggested_filename == "selfsup-papers.bib"
    assert Path(download.value.path()).read_text(encoding="utf-8") == bib
    page.assert_clean()


def test_compare_view_side_by_side(page, built_site, artifacts):
    methods = [e for e in built_site.catalog if e.kind == "method"]
    page.open("compare/methods/?m=simclr,byol")
    page.tab.wait_for_selector('#compare-table[data-state="ready"] table')
    heads = page.tab.locator("#compare-table thead th").all_inner_texts()
    assert len(heads) == 3 and heads[1].startswith("SimCLR") and heads[2].startswith("BYOL")
    rows = page.tab.locator("#compare-table tbody th").all_inner_texts()
    for prop in built_site.catalog.taxonomy.properties:
        assert prop.name in rows
    assert page.tab.locator("#compare-table .katex").count() >= 2  # both objectives rendered
    # SimCLR has negatives, BYOL has none: that row is marked as differing
    negatives = page.tab.locator("#compare-table tbody tr", has=page.tab.locator("th", has_text="Negatives"))
    assert "compare-differs" in (negatives.first.get_attribute("class") or "")
    # add from the picker, remove with a chip; the address follows
    page.tab.fill('#compare-picker input[name="pick"]', "Barlow Twins")
    page.tab.click('#compare-picker button[name="add"]')
    page.tab.wait_for_function('new URLSearchParams(location.search).get("m") === "simclr,byol,barlow-twins"')
    assert page.tab.locator("#compare-table thead th").count() == 4
    page.tab.screenshot(path=str(artifacts / "compare.png"), full_page=True)
    page.tab.click('#compare-chosen button[data-id="byol"]')
    page.tab.wait_for_function('new URLSearchParams(location.search).get("m") === "simclr,barlow-twins"')
    assert page.tab.locator("#compare-table thead th").count() == 3
    assert len(methods) > 4
    page.open(f"compare/methods/?m={','.join(e.id for e in methods[:6])}")  # at most four
    page.tab.wait_for_selector('#compare-table[data-state="ready"] table')
    assert page.tab.locator("#compare-table thead th").count() == 5
    # a method page links its comparison
    page.open("papers/byol/")
    page.tab.click('a[href*="compare/methods/?m=byol"]')
    page.tab.wait_for_selector('#compare-chosen button[data-id="byol"]')
    page.assert_clean()
