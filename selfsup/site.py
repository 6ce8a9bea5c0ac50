"""The documentation site: catalog + taxonomy + measured results -> Markdown pages -> mkdocs-material.

The generator follows data -> model -> templates:

1. data: [`load_site_data`][selfsup.site.load_site_data] loads and validates the catalog (``selfsup.catalog``)
   and the measured results (``benchmarks/results/*.json``); any problem stops the build with the full list;
2. model: [`build_model`][selfsup.site.build_model] computes what the pages need (lineage, tables, counts,
   filters);
3. templates: [`render_pages`][selfsup.site.render_pages] renders the jinja2 templates in ``site/templates``
   with ``StrictUndefined`` into Markdown, one string per page. Every string from the data passes a filter
   that keeps it text (``md``, ``cell``, ``code``), an http(s) link (``link``) or math (``math``): nothing in
   the catalog becomes HTML, a script or an attribute on the page.

``site/gen_pages.py`` (run by mkdocs-gen-files during ``mkdocs build``) writes those pages into the build;
nothing generated is committed. Implementation sources are embedded by ``pymdownx.snippets`` (``--8<--`` lines
resolved from the repository root), never pasted. [`build`][selfsup.site.build] and
[`serve`][selfsup.site.serve] back ``selfsup site build`` and ``selfsup site serve``.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import subprocess
import sys
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from selfsup import catalog as cat
from selfsup import site_data, site_lineage, site_search, site_tables

# Modules documented on the API page, in this order. Adding a module is a one-line change here;
# modules that do not exist (yet) in the repository are skipped.
API_MODULES = [
    "selfsup.catalog",
    "selfsup.data",
    "selfsup.backbones",
    "selfsup.methods",
    "selfsup.train",
    "selfsup.evaluate",
    "selfsup.bench",
    "selfsup.cli",
    "selfsup.site",
]

# Suggested first reads on the home page (those present in the catalog are shown, in this order).
START_HERE = ["simclr", "moco", "byol", "simsiam", "swav", "dino", "barlow-twins", "vicreg", "mae", "i-jepa"]

# Environment variable that points the generator at another data root (catalog/, taxonomy/,
# benchmarks/results/, implementations/) than the directory holding mkdocs.yml.
ROOT_ENV = "SELFSUP_SITE_ROOT"

# Read by mkdocs.yml (``!ENV``): where the site is published, where its sources live, and whether the
# build is the offline one (readable from file://). None of them is known to the repository.
SITE_URL_ENV = "SELFSUP_SITE_URL"
REPO_URL_ENV = "SELFSUP_REPO_URL"
OFFLINE_ENV = "SELFSUP_OFFLINE"
# The branch the entry pages link implementation files on (``{repo_url}/blob/{branch}/{path}``).
REPO_BRANCH = "main"


class SiteError(Exception):
    """The site cannot be built from this data; holds every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"the site cannot be built: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems)
        )


# --------------------------------------------------------------------------------------------
# Data: measured results (benchmarks/results/*.json)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    kind: str  # "accuracy" (a fraction, shown in %), "number", "score" (NMI, ARI), "seconds", "step" (s per step), "ratio"


METRICS = [
    Metric("knn_top1", "kNN top-1 (%)", "accuracy"),
    Metric("random_init_knn_top1", "kNN top-1, random init (%)", "accuracy"),
    Metric("linear_top1", "Linear top-1 (%)", "accuracy"),
    Metric("random_init_linear_top1", "Linear top-1, random init (%)", "accuracy"),
    Metric("rankme", "RankMe", "number"),
    Metric("kmeans_nmi", "k-means NMI", "score"),
    Metric("random_init_kmeans_nmi", "k-means NMI, random init", "score"),
    Metric("kmeans_ari", "k-means ARI", "score"),
    Metric("random_init_kmeans_ari", "k-means ARI, random init", "score"),
    Metric("kmeans_cluster_acc", "k-means cluster acc. (%)", "accuracy"),
    Metric("random_init_kmeans_cluster_acc", "k-means cluster acc., random init (%)", "accuracy"),
    Metric("assign_nmi", "Own clusters NMI", "score"),
    Metric("assign_ari", "Own clusters ARI", "score"),
    Metric("assign_cluster_acc", "Own clusters acc. (%)", "accuracy"),
    Metric("train_seconds", "Train time (s)", "seconds"),
    Metric("hook_features_s", "Epoch hook: features pass (s)", "step"),
    Metric("hook_work_s", "Epoch hook: clustering / assignment (s)", "step"),
    Metric("pure_step_s", "Pure step (s)", "step"),
    Metric("train_step_device_s", "Train step, device views (s)", "step"),
    Metric("train_step_loader_s", "Train step, loader views (s)", "step"),
    Metric("device_ratio", "Throughput ratio, device views", "ratio"),
    Metric("loader_ratio", "Throughput ratio, loader views", "ratio"),
]


class MeasuredRow(BaseModel):
    """One method's numbers in one results file. Unknown extra fields are kept but not shown."""

    model_config = ConfigDict(extra="allow")

    method: str
    backbone: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    knn_top1: float | None = Field(default=None, ge=0, le=1)
    random_init_knn_top1: float | None = Field(default=None, ge=0, le=1)
    linear_top1: float | None = Field(default=None, ge=0, le=1)
    random_init_linear_top1: float | None = Field(default=None, ge=0, le=1)
    rankme: float | None = None
    kmeans_nmi: float | None = Field(default=None, ge=0, le=1)
    random_init_kmeans_nmi: float | None = Field(default=None, ge=0, le=1)
    kmeans_ari: float | None = Field(default=None, ge=-1, le=1)
    random_init_kmeans_ari: float | None = Field(default=None, ge=-1, le=1)
    kmeans_cluster_acc: float | None = Field(default=None, ge=0, le=1)
    random_init_kmeans_cluster_acc: float | None = Field(default=None, ge=0, le=1)
    assign_nmi: float | None = Field(default=None, ge=0, le=1)
    assign_ari: float | None = Field(default=None, ge=-1, le=1)
    assign_cluster_acc: float | None = Field(default=None, ge=0, le=1)
    train_seconds: float | None = Field(default=None, ge=0)
    hook_features_s: float | None = Field(default=None, ge=0)
    hook_work_s: float | None = Field(default=None, ge=0)
    pure_step_s: float | None = Field(default=None, gt=0)
    train_step_device_s: float | None = Field(default=None, gt=0)
    train_step_loader_s: float | None = Field(default=None, gt=0)
    device_ratio: float | None = Field(default=None, gt=0)
    loader_ratio: float | None = Field(default=None, gt=0)


class MeasuredFile(BaseModel):
    """A results file written by our benchmark (``benchmarks/results/<name>.json``)."""

    model_config = ConfigDict(extra="allow")

    benchmark: str = Field(min_length=1)
    title: str = Field(min_length=1)
    description: str = ""
    dataset: str | None = None
    device: str | None = None
    date: str | None = None
    command: str | None = None
    rows: list[MeasuredRow]

    @field_validator("date")
    @classmethod
    def _iso_date(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^\d{4}-\d{2}-\d{2}$", v):
            raise ValueError(f"expected YYYY-MM-DD, got {v!r}")
        return v


@dataclass
class Measured:
    """A loaded results file plus what its page section needs."""

    path: str  # relative to the repository root
    anchor: str
    data: MeasuredFile
    metrics: list[Metric]  # the metric columns with at least one value


def load_measured(root: Path, known_ids: set[str]) -> tuple[list[Measured], list[str]]:
    """Read every ``benchmarks/results/*.json``; return the files and a list of problems."""
    out: list[Measured] = []
    problems: list[str] = []
    rdir = root / "benchmarks" / "results"
    for path in sorted(rdir.glob("*.json")) if rdir.is_dir() else []:
        display = path.relative_to(root).as_posix()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{display}: not valid JSON ({e})")
            continue
        try:
            data = MeasuredFile.model_validate(raw)
        except ValidationError as e:
            for err in e.errors():
                where = ".".join(str(x) for x in err["loc"]) or "(file)"
                problems.append(f"{display}: {where}: {err['msg']}")
            continue
        for i, row in enumerate(data.rows):
            if row.method not in known_ids:
                problems.append(f"{display}: rows[{i}].method: no catalog entry {row.method!r}")
        metrics = [m for m in METRICS if any(getattr(r, m.key) is not None for r in data.rows)]
        anchor = "measured-" + re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")
        out.append(Measured(display, anchor, data, metrics))
    out.sort(key=lambda m: (m.data.benchmark, m.data.date or "", m.path))
    return out, problems


def load_site_data(root: Path) -> tuple[cat.Catalog, list[Measured]]:
    """Load and validate everything the site shows; raise [`SiteError`][selfsup.site.SiteError] listing every
    problem."""
    try:
        catalog = cat.load_catalog(root)
    except cat.CatalogError as e:  # a broken taxonomy
        raise SiteError([str(p) for p in e.problems]) from None
    problems = [str(p) for p in catalog.problems]
    measured, more = load_measured(root, set(catalog.entries))
    problems += more
    if problems:
        raise SiteError(problems)
    return catalog, measured


# --------------------------------------------------------------------------------------------
# Model: what the pages need
# --------------------------------------------------------------------------------------------


def entry_page(entry_id: str) -> str:
    return f"papers/{entry_id}.md"


def family_page(family_id: str) -> str:
    return f"families/{family_id}.md"


def display_name(entry: cat.Entry) -> str:
    """Short name of an entry: its ``name`` field, else "First-author et al. year" as papers are cited
    (the catalog id is a slug for URLs, not a name to read)."""
    name = getattr(entry, "name", None)
    if name:
        return name
    if not entry.authors:
        return entry.id
    surname = entry.authors[0].split()[-1]
    more = len(entry.authors) > 1 or (entry.author_count or 1) > 1
    return f"{surname}{' et al.' if more else ''} {entry.year}"


def _heading(entry: cat.Entry) -> str:
    """The paper's title as plain text, led by the method's name when the title does not contain it.

    Readers search by method name ("simclr"), which few titles contain; the search index ranks
    title words highest. Plain text: <title> and the search index cannot render math.
    """
    title = site_search.plain_text(entry.title)
    name = getattr(entry, "name", None)
    # NFKC folds "AstroM³" to "AstroM3", the name as written
    if name and name.lower() not in unicodedata.normalize("NFKC", title).lower():
        return f"{name} — {title}"
    return title


def page_url(src: str, use_directory_urls: bool = True) -> str:
    """The URL mkdocs gives a page, relative to the site root (``papers/simclr.md`` -> ``papers/simclr/``)."""
    stem = src[: -len(".md")]
    if not use_directory_urls:
        return stem + ".html"
    if stem == "index":
        return ""
    if stem.endswith("/index"):
        return stem[: -len("index")]
    return stem + "/"


def relative_url(from_src: str, to_src: str, use_directory_urls: bool = True) -> str:
    """Relative URL from one page to another as the browser resolves it (for raw HTML and the lineage data)."""
    here = page_url(from_src, use_directory_urls)
    base = here if here.endswith("/") or not here else posixpath.dirname(here)
    target = page_url(to_src, use_directory_urls)
    rel = posixpath.relpath(target or ".", base.rstrip("/") or ".")
    if use_directory_urls and not rel.endswith("/") and not rel.endswith(".html"):
        rel += "/"
    return rel


@dataclass
class PropertyValue:
    prop: cat.Property
    value: Any
    text: str


@dataclass
class EntryView:
    entry: cat.Entry
    page: str
    name: str
    family: dict[str, Any] | None
    subfamily: dict[str, Any] | None
    also: list[dict[str, Any]]
    modalities: list[dict[str, Any]]
    kind: dict[str, Any]
    authors: str
    short_authors: str  # "First Author et al.", for dense tables
    builds_on: list[cat.Entry]
    built_upon_by: list[cat.Entry]
    properties: list[PropertyValue]
    results: list[tuple[cat.Result, dict[str, Any]]]
    measured: list[tuple[Measured, MeasuredRow]]
    bibtex: str
    search_text: str
    heading: str  # the page title: the method's name leads when the paper's title lacks it
    title_text: str  # the paper's title as plain text (no math)
    keywords: list[str]  # front-matter tags: what the search weights above the body
    search_boost: float
    facets: dict[str, str]  # property id -> the value the matrix filters match (site_tables.facet)


@dataclass
class SubfamilyView:
    sub: dict[str, Any]
    entries: list[EntryView]


@dataclass
class FamilyView:
    family: dict[str, Any]
    page: str
    subfamilies: list[SubfamilyView]
    unassigned: list[EntryView]  # primary family, no sub-family
    secondary: list[EntryView]  # lists the family under `also`
    methods: list[EntryView]  # kind == method, primary family
    n_entries: int


# The reported-results page's default view: rows pretrained without labels on this data.
COMPARABLE_DATA = "imagenet-1k"


@dataclass
class ReportedRow:
    v: EntryView
    result: cat.Result
    labels: bool  # pretraining used labels (the result says so, or the entry is supervised contrastive)
    data: str | None  # the pretraining data's name; None when the catalog does not say
    comparable: bool  # no labels and ImageNet-1k: shown by default


@dataclass
class SiteModel:
    catalog: cat.Catalog
    taxonomy: cat.Taxonomy
    entries: list[EntryView]  # sorted by (year, id)
    by_id: dict[str, EntryView]
    families: list[FamilyView]
    unfamilied: list[EntryView]
    measured: list[Measured]
    counts: dict[str, int]
    start_here: list[EntryView]
    implemented: list[EntryView]
    years: list[int]
    timeline: list[tuple[int, list[list[EntryView]]]]  # per year: one cell per family + "none"
    lineage: dict[str, Any]  # the whole graph, for the lineage page (site_lineage.graph_data)
    lineage_edge_count: int
    lineage_node_count: int
    local_graphs: dict[str, site_lineage.LocalGraph]  # entry id -> its ancestors and descendants
    family_colours: dict[str | None, str]
    isolated_methods: list[EntryView]
    reported: list[tuple[dict[str, Any], list[ReportedRow]]]  # per benchmark, comparable rows first
    api_modules: list[str]
    kind_counts: dict[str, int]
    modality_counts: dict[str, int]
    property_columns: list[site_tables.PropertyColumn] = field(default_factory=list)
    methods: list[EntryView] = field(default_factory=list)  # kind == method, by family then year
    use_directory_urls: bool = True
    family_by_id: dict[str, FamilyView] = field(default_factory=dict)
    pretrain_names: dict[str, str] = field(default_factory=dict)  # taxonomy/pretrain_data.yaml id -> name
    repo_url: str | None = None  # mkdocs' repo_url ($SELFSUP_REPO_URL): implementation links open there

    def source_url(self, path: str) -> str | None:
        """The file ``path`` (relative to the repository root) in the repository; None without a repo_url."""
        if not self.repo_url:
            return None
        return f"{self.repo_url.rstrip('/')}/blob/{REPO_BRANCH}/{quote(path.lstrip('/'))}"


def _format_property(prop: cat.Property, value: Any) -> str:
    if value is None:
        return "?"
    if prop.type == "bool":
        return "yes" if value else "no"
    return str(value).replace("_", " ")


def _authors(entry: cat.Entry) -> str:
    text = ", ".join(entry.authors)
    if entry.author_count and len(entry.authors) < entry.author_count:
        more = entry.author_count - len(entry.authors)
        text = f"{text} and {more} more" if text else f"{entry.author_count} authors"
    return text


def _short_authors(entry: cat.Entry) -> str:
    if not entry.authors:
        return f"{entry.author_count} authors" if entry.author_count else "–"
    more = len(entry.authors) > 1 or (entry.author_count or 1) > 1
    return entry.authors[0] + (" et al." if more else "")


def module_exists(root: Path, module: str) -> bool:
    """Whether ``module`` (dotted) is a file or package under the repository root."""
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def build_model(
    catalog: cat.Catalog,
    measured: list[Measured],
    code_root: Path,
    use_directory_urls: bool = True,
    repo_url: str | None = None,
) -> SiteModel:
    """Everything the templates need; ``code_root`` is where mkdocstrings finds ``selfsup``."""
    tax = catalog.taxonomy
    fam_by_id = {f["id"]: f for f in tax.families}
    kinds = {k["id"]: k for k in tax.kinds}
    mods = {m["id"]: m for m in tax.modalities}
    benchmarks = {b["id"]: b for b in tax.benchmarks}
    measured_by_method: dict[str, list[tuple[Measured, MeasuredRow]]] = defaultdict(list)
    for m in measured:
        for row in m.data.rows:
            measured_by_method[row.method].append((m, row))

    columns = site_tables.property_columns(tax.properties)
    views: list[EntryView] = []
    for e in catalog.sorted():
        family = fam_by_id.get(e.family) if e.family else None
        sub = None
        if family and e.subfamily:
            sub = next(s for s in family.get("subfamilies", []) if s["id"] == e.subfamily)
        props = [
            PropertyValue(p, e.properties.get(p.id), _format_property(p, e.properties.get(p.id)))
            for p in tax.properties
            if p.id in e.properties
        ]
        views.append(
            EntryView(
                entry=e,
                page=entry_page(e.id),
                name=display_name(e),
                family=family,
                subfamily=sub,
                also=[fam_by_id[f] for f in e.also],
                modalities=[mods[m] for m in e.modalities],
                kind=kinds[e.kind],
                authors=_authors(e),
                short_authors=_short_authors(e),
                builds_on=[catalog.entries[i] for i in e.builds_on],
                built_upon_by=catalog.built_upon_by(e.id),
                properties=props,
                results=[(r, benchmarks[r.benchmark]) for r in e.results],
                measured=measured_by_method.get(e.id, []),
                bibtex=cat.bibtex(e),
                search_text=" ".join(
                    [e.id, e.name or "", site_search.plain_text(e.title), *e.authors, *e.tags]
                ).lower(),
                heading=_heading(e),
                title_text=site_search.plain_text(e.title),
                keywords=site_search.keywords(e, display_name(e)),
                search_boost=site_search.search_boost(e, len(catalog.built_upon_by(e.id))),
                facets=site_tables.facets(e, columns),
            )
        )
    by_id = {v.entry.id: v for v in views}

    families = []
    for f in tax.families:
        primary = [v for v in views if v.entry.family == f["id"]]
        subs = [
            SubfamilyView(s, [v for v in primary if v.entry.subfamily == s["id"]])
            for s in f.get("subfamilies", [])
        ]
        secondary = [v for v in views if f["id"] in v.entry.also]
        families.append(
            FamilyView(
                family=f,
                page=family_page(f["id"]),
                subfamilies=subs,
                unassigned=[v for v in primary if v.entry.subfamily is None],
                secondary=secondary,
                methods=[v for v in primary if v.entry.kind == "method"],
                n_entries=len(primary),
            )
        )
    unfamilied = [v for v in views if v.entry.family is None]

    years = sorted({v.entry.year for v in views})
    timeline = []
    for y in years:
        cells = [[v for v in views if v.entry.year == y and v.entry.family == f["id"]] for f in tax.families]
        cells.append([v for v in views if v.entry.year == y and v.entry.family is None])
        timeline.append((y, cells))

    # Lineage: every entry connected by builds_on, whatever its kind (analyses build on methods too).
    nodes = {
        v.entry.id: site_lineage.Node(
            v.entry.id, v.name, v.entry.year, v.entry.family, v.entry.kind, tuple(v.entry.modalities),
            v.title_text,
        )
        for v in views
    }
    parents = {v.entry.id: list(v.entry.builds_on) for v in views}
    children: dict[str, list[str]] = defaultdict(list)
    for child, ps in parents.items():
        for p in ps:
            children[p].append(child)
    edges_ids = site_lineage.edges_of(parents)
    connected = {i for edge in edges_ids for i in edge}
    lineage = site_lineage.graph_data(
        list(nodes.values()),
        edges_ids,
        [(f["id"], f["name"]) for f in tax.families],
        [(m["id"], m["name"]) for m in tax.modalities],
        [(k["id"], k["name"]) for k in tax.kinds],
        lambda i: relative_url("lineage.md", entry_page(i), use_directory_urls),
    )
    local_graphs = {}
    for i in connected:
        g = site_lineage.local_graph(i, nodes, parents, children)
        if g is not None:
            local_graphs[i] = g
    methods = [v for v in views if v.entry.kind == "method"]

    # Reported results: comparable rows (no labels in pretraining, ImageNet-1k) are the page's default view.
    data_names = {d["id"]: d["name"] for d in tax.pretrain_data}
    reported = []
    for b in tax.benchmarks:
        rows = []
        for v in views:
            for r in v.entry.results:
                if r.benchmark != b["id"]:
                    continue
                labels = r.pretrain_labels or (v.subfamily is not None and v.subfamily["id"] == "supervised")
                data = data_names.get(r.pretrain_data) if r.pretrain_data else None
                rows.append(ReportedRow(v, r, labels, data, not labels and r.pretrain_data == COMPARABLE_DATA))
        if rows:
            rows.sort(key=lambda x: (not x.comparable, x.result.metric, -x.result.value))
            reported.append((b, rows))

    present_start = [by_id[i] for i in START_HERE if i in by_id]
    implemented = [v for v in views if v.entry.implementation]
    model = SiteModel(
        catalog=catalog,
        taxonomy=tax,
        entries=views,
        by_id=by_id,
        families=families,
        unfamilied=unfamilied,
        measured=measured,
        counts={
            "papers": len(views),
            "methods": len(methods),
            "implementations": len(implemented),
            "families": len(tax.families),
            "subfamilies": sum(len(f.get("subfamilies", [])) for f in tax.families),
            "results": sum(len(v.entry.results) for v in views),
            "measured": sum(len(m.data.rows) for m in measured),
        },
        start_here=present_start,
        implemented=implemented,
        years=years,
        timeline=timeline,
        lineage=lineage,
        lineage_edge_count=len(edges_ids),
        lineage_node_count=len(connected),
        local_graphs=local_graphs,
        family_colours=site_lineage.family_colours([f["id"] for f in tax.families]),
        isolated_methods=[v for v in methods if v.entry.id not in connected],
        reported=reported,
        pretrain_names={d["id"]: d["name"] for d in tax.pretrain_data},
        api_modules=[m for m in API_MODULES if module_exists(code_root, m)],
        kind_counts={k["id"]: sum(v.entry.kind == k["id"] for v in views) for k in tax.kinds},
        modality_counts={m["id"]: sum(m["id"] in v.entry.modalities for v in views) for m in tax.modalities},
        property_columns=columns,
        methods=[v for f in families for v in f.methods] + [v for v in methods if v.entry.family is None],
        use_directory_urls=use_directory_urls,
        repo_url=repo_url or None,
    )
    model.family_by_id = {f.family["id"]: f for f in families}
    return model


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


# What would turn catalog text into markup: HTML tags and entities (< > &), links and images ([ ]),
# attribute lists of the attr_list extension ({: onclick="..." }) and backslash escapes (\[ is also a
# math delimiter). As numeric entities these characters show as themselves and mean nothing.
_MD_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"} | {c: f"&#{ord(c)};" for c in "[]{}\\"})


def _one_line(value: Any) -> str:
    """Whitespace runs, line breaks included, as one space: a value cannot end a block or a fence early."""
    return " ".join(str(value).split())


def _md_text(value: Any) -> str:
    """Catalog text as one line of Markdown, shown as written: never HTML, a link, an attribute list, or
    a block of its own (a line break could open a code fence, a heading or a link definition)."""
    return _one_line(value).translate(_MD_ESCAPES)


def _cell(value: Any) -> str:
    """Catalog text in a Markdown table cell: as `_md_text`, with pipes escaped."""
    return _md_text(value).replace("|", r"\|")


def _code(value: Any) -> str:
    """Text as an inline code span, fenced by more backticks than any run it holds, so it cannot end early."""
    text = _one_line(value)
    ticks = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks} {text} {ticks}"


def _command(value: Any) -> str:
    """A recorded command as inline code, with paths outside the repository reduced to
    ``path/to/<file name>``: where the data lay on the machine that ran it differs on a reader's."""
    parts = []
    for arg in str(value).split():
        name, eq, path = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if path.startswith(("/", "../", "~")):
            path = "path/to/" + path.rstrip("/").rsplit("/", 1)[-1]
        parts.append(f"{name}{eq}{path}")
    return _code(" ".join(parts))


def _link(url: str) -> str:
    """An http(s) URL as a Markdown link target, percent-encoding what could end the target (parentheses,
    spaces, quotes). The catalog allows only http(s) URLs; anything else here is a bug, and stops the build.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise SiteError([f"not an http(s) URL, refused as a link: {url!r}"])
    return quote(url, safe=";/?:@&=+$,-_.!~*#%")


def _math(latex: str) -> str:
    """LaTeX for a ``$$`` block, which arithmatex escapes for HTML; what could end the block early (a blank
    line, a ``$``) is dropped or escaped. The catalog refuses ``$`` too; this holds whatever it lets through.
    """
    text = "\n".join(line for line in latex.strip().splitlines() if line.strip())
    return re.sub(r"\\.|\$", lambda m: "\\$" if m.group() == "$" else m.group(), text)


def _metric(value: float | None, metric: Metric | str) -> str:
    """A measured number for display; ``metric`` is a [`Metric`][selfsup.site.Metric] or its kind."""
    kind = metric.kind if isinstance(metric, Metric) else metric
    if value is None:
        return "–"
    if kind == "accuracy":
        return f"{100 * value:.1f}"
    if kind == "seconds":
        return f"{value:.0f}"
    if kind == "step":
        return f"{value:.3f}"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "score":
        return f"{value:.3f}"
    return f"{value:.1f}"


def _number(value: float | int | None) -> str:
    if value is None:
        return "–"
    return f"{value:g}"


def template_env(templates: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: use |e where a value lands inside raw HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        cell=_cell,
        code=_code,
        command=_command,
        link=_link,
        math=_math,
        md=_md_text,
        one_line=_one_line,
        metric=_metric,
        number=_number,
    )
    return env


@dataclass
class Page:
    """A generated page: where it goes, which template renders it, and with what."""

    path: str
    template: str
    context: dict[str, Any]


def plan_pages(model: SiteModel) -> list[Page]:
    pages = [
        Page("index.md", "home.md.j2", {}),
        Page("papers/index.md", "papers_index.md.j2", {}),
        Page("families/index.md", "families_index.md.j2", {}),
        Page("taxonomy.md", "taxonomy.md.j2", {}),
        Page("timeline.md", "timeline.md.j2", {}),
        Page("lineage.md", "lineage.md.j2", {}),
        Page("compare/properties.md", "properties.md.j2", {}),
        Page("compare/reported.md", "reported.md.j2", {}),
        Page("compare/measured.md", "measured.md.j2", {}),
        Page("compare/methods.md", "compare.md.j2", {}),
        Page("methods/index.md", "methods.md.j2", {}),
        Page("api.md", "api.md.j2", {}),
    ]
    pages += [Page(f.page, "family.md.j2", {"fam": f}) for f in model.families]
    pages += [Page(v.page, "entry.md.j2", {"v": v}) for v in model.entries]
    return pages


def render_pages(
    root: Path,
    templates: Path | None = None,
    use_directory_urls: bool = True,
    code_root: Path | None = None,
    repo_url: str | None = None,
) -> dict[str, str]:
    """Every generated page as ``{path under docs_dir: Markdown}``, and the lineage page's data
    (``assets/generated/lineage-data.js``); raises
    [`SiteError`][selfsup.site.SiteError].

    ``root`` holds the data (catalog/, taxonomy/, benchmarks/results/), ``templates`` the jinja2
    templates (default ``root/site/templates``), ``code_root`` the package the API page documents,
    ``repo_url`` the repository the implementation links open (default: ``$SELFSUP_REPO_URL``, which
    mkdocs.yml's ``repo_url`` reads too; none: they point to the code on the page).
    """
    root = Path(root)
    catalog, measured = load_site_data(root)
    if repo_url is None:
        repo_url = os.environ.get(REPO_URL_ENV) or None
    model = build_model(catalog, measured, Path(code_root or root), use_directory_urls, repo_url)
    env = template_env(templates or root / "site" / "templates")
    out: dict[str, str] = {}
    for page in plan_pages(model):
        here = posixpath.dirname(page.path)

        def rel(target: str, _here: str = here) -> str:
            """Markdown link from this page to another page (mkdocs resolves and checks it)."""
            path, _, anchor = target.partition("#")
            link = posixpath.relpath(path, _here or ".")
            return f"{link}#{anchor}" if anchor else link

        def url(target: str, _src: str = page.path) -> str:
            """Browser URL from this page to another page, for raw HTML and diagrams."""
            return relative_url(_src, target, use_directory_urls)

        def local_graph(entry_id: str, _url=url) -> str:
            """The entry's ancestors and descendants as inline HTML ("" when it has none)."""
            g = model.local_graphs.get(entry_id)
            if g is None:
                return ""
            return site_lineage.local_html(g, lambda i: _url(entry_page(i)), model.family_colours)

        template = env.get_template(page.template)
        out[page.path] = template.render(
            m=model, rel=rel, url=url, page=page.path, local_graph=local_graph, **page.context
        )
    out[site_lineage.DATA_FILE] = site_data.script(model.lineage, "SELFSUP_LINEAGE")
    out[site_data.PAPERS_FILE] = site_data.script(site_data.papers_export(model), "SELFSUP_PAPERS")
    compare_url = functools.partial(relative_url, site_data.COMPARE_PAGE, use_directory_urls=use_directory_urls)
    out[site_data.METHODS_FILE] = site_data.script(site_data.methods_compare(model, compare_url), "SELFSUP_METHODS")
    return out


# --------------------------------------------------------------------------------------------
# Build and serve (``selfsup site build|serve``)
# --------------------------------------------------------------------------------------------


def config_file(root: Path) -> Path:
    """The repository's mkdocs.yml; a data root without one uses this checkout's."""
    own = root / "mkdocs.yml"
    return own if own.is_file() else cat.ROOT / "mkdocs.yml"


def _data_ok(root: Path) -> bool:
    """Whether the data builds; if not, print every problem (before mkdocs starts, or writes anything)."""
    try:
        load_site_data(root)
    except SiteError as e:
        print(e, file=sys.stderr)
        return False
    return True


def _mkdocs(root: Path, args: list[str], offline: bool | None = None) -> int:
    """Run mkdocs on ``root``; ``offline`` sets $SELFSUP_OFFLINE (None: as the environment has it)."""
    env = dict(
        os.environ, **{ROOT_ENV: str(root), "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    )
    if offline is not None:
        env[OFFLINE_ENV] = "true" if offline else "false"
    cmd = [sys.executable, "-m", "mkdocs", *args, "--config-file", str(config_file(root))]
    # cwd=root: pymdownx.snippets resolves implementation paths from the repository root.
    return subprocess.call(cmd, cwd=root, env=env)


# Marks a directory as a site build: `site build` empties only directories that carry it (or are empty).
# mkdocs' --clean keeps dot files, so the marker survives every rebuild.
SITE_MARKER = ".selfsup-site"


class _IgnoreTagsLoader(yaml.SafeLoader):
    """Reads mkdocs.yml for plain settings; its tags (``!!python/name``, ``!ENV``) become None, never run."""


_IgnoreTagsLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def default_site_dir(config: Path) -> Path:
    """The ``site_dir`` of an mkdocs.yml (mkdocs' default: ``site``), resolved against its directory."""
    settings = yaml.load(config.read_text(encoding="utf-8"), Loader=_IgnoreTagsLoader) or {}
    return (config.parent / settings.get("site_dir", "site")).resolve()


def output_dir_problem(out: Path, root: Path) -> str | None:
    """Why the site may not be built into ``out`` (which it empties first), or None when it may."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        return "is a file, not a directory"
    for repo in {root.resolve(), config_file(root).parent.resolve()}:
        if out == repo or out in repo.parents:
            return f"is or contains the repository {repo}; building there would delete it"
        for data in (repo / "catalog", repo / "taxonomy"):
            if out == data or data in out.parents:
                return f"is or is inside {data}, which holds the catalog data the site is built from"
    if out.is_dir() and any(out.iterdir()) and not (out / SITE_MARKER).is_file():
        return (
            f"is not empty and holds no {SITE_MARKER} file from a previous site build; building would "
            "delete what it holds: give an empty or new directory, or empty this one yourself"
        )
    return None


def offline_default() -> bool:
    """Whether a build is the offline one: as $SELFSUP_OFFLINE says, else when no $SELFSUP_SITE_URL is set."""
    flag = os.environ.get(OFFLINE_ENV, "").strip().lower()
    if flag:
        return flag not in {"0", "false", "no", "off"}
    return not os.environ.get(SITE_URL_ENV, "").strip()


def build(
    root: Path = cat.ROOT, out_dir: Path | None = None, strict: bool = False, offline: bool | None = None
) -> int:
    """Build the site into ``out_dir`` (default: mkdocs.yml's ``build/site``); return the exit code.

    ``offline`` (default: [`offline_default`][selfsup.site.offline_default]) builds the site for reading
    from ``file://``: pages as ``.html`` files and the search index inlined into a script. mkdocs empties
    the output directory first, so it must be a new or empty directory, or one that a previous build
    marked with `SITE_MARKER` (`.selfsup-site`); anything else is refused with a one-line error.
    """
    root = Path(root).resolve()
    out = Path(out_dir).resolve() if out_dir is not None else default_site_dir(config_file(root))
    problem = output_dir_problem(out, root)
    if problem:
        print(f"selfsup site build: error: {out}: {problem}", file=sys.stderr)
        return 2
    if not _data_ok(root):
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / SITE_MARKER).write_text("Built by `selfsup site build`, which may empty this directory.\n")
    args = ["build", "--clean", "--site-dir", str(out)]
    if strict:
        args.append("--strict")
    return _mkdocs(root, args, offline=offline_default() if offline is None else offline)


def serve(root: Path = cat.ROOT, addr: str = "127.0.0.1:8000") -> int:
    """Serve the site with live reload, also watching the catalog and the code; return the exit code."""
    root = Path(root).resolve()
    args = ["serve", "--dev-addr", addr]
    for sub in ["catalog", "taxonomy", "benchmarks/results", "implementations", "selfsup"]:
        if (root / sub).is_dir():
            args += ["--watch", str(root / sub)]
    if not _data_ok(root):
        return 1
    try:
        return _mkdocs(root, args, offline=False)  # served over http: directory URLs, the search worker
    except KeyboardInterrupt:
        return 0
