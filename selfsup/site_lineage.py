"""The site's lineage: the whole graph for the interactive page, and each entry's local graph.

An edge goes from an entry to an entry that lists it in ``builds_on``. The lineage page draws every
connected entry with Cytoscape.js and its dagre layout (vendored; loaded only on that page by
``assets/js/lineage.js``) from the data this module writes to ``assets/generated/lineage-data.js``. Each
entry page shows its ancestors and descendants within two hops, laid out here as positioned HTML links
over SVG arrows: no script, a few kilobytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

DATA_FILE = "assets/generated/lineage-data.js"

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), in taxonomy order.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
NO_FAMILY = "#7F7F7F"

HOPS = 2
MAX_PER_COLUMN = 8  # nodes per column of a local graph; the rest are counted, the lists below name them
NODE_W, NODE_H, COL_GAP, ROW_GAP = 140, 30, 36, 8


def family_colours(family_ids: Sequence[str]) -> dict[str | None, str]:
    colours: dict[str | None, str] = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(family_ids)}
    colours[None] = NO_FAMILY
    return colours


def text_colour(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (#rrggbb), by relative luminance."""
    r, g, b = (int(background[i : i + 2], 16) / 255 for i in (1, 3, 5))
    lum = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    y = 0.2126 * lum[0] + 0.7152 * lum[1] + 0.0722 * lum[2]
    return "#111111" if (y + 0.05) / 0.05 > 1.05 / (y + 0.05) else "#ffffff"


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    year: int
    family: str | None
    kind: str
    modalities: tuple[str, ...]
    title: str


def edges_of(builds_on: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """(parent, child) for every ``builds_on`` link whose ends are both in the mapping."""
    return [(p, c) for c, parents in builds_on.items() for p in parents if p in builds_on]


# --------------------------------------------------------------------------------------------
# The whole graph (lineage page)
# --------------------------------------------------------------------------------------------


def graph_data(
    nodes: Sequence[Node],
    edges: Sequence[tuple[str, str]],
    families: Sequence[tuple[str, str]],
    modalities: Sequence[tuple[str, str]],
    kinds: Sequence[tuple[str, str]],
    url_of: Callable[[str], str],
) -> dict:
    """What the lineage page draws: the entries with at least one link, the links, and the vocabularies
    (id, name) of the filters, each listing only values that occur."""
    connected = {i for e in edges for i in e}
    shown = [n for n in nodes if n.id in connected]
    colours = family_colours([f for f, _ in families])
    fams = {n.family for n in shown}
    mods = {m for n in shown for m in n.modalities}
    used_kinds = {n.kind for n in shown}
    return {
        "families": [
            {"id": f, "name": name, "colour": colours[f], "text": text_colour(colours[f])}
            for f, name in families
            if f in fams
        ]
        + ([{"id": None, "name": "No family", "colour": NO_FAMILY, "text": text_colour(NO_FAMILY)}]
           if None in fams else []),
        "modalities": [{"id": m, "name": name} for m, name in modalities if m in mods],
        "kinds": [{"id": k, "name": name} for k, name in kinds if k in used_kinds],
        "nodes": [
            {
                "id": n.id, "name": n.name, "year": n.year, "family": n.family, "kind": n.kind,
                "modalities": list(n.modalities), "title": n.title, "url": url_of(n.id),
            }
            for n in shown
        ],
        "edges": [list(e) for e in edges],
    }


# --------------------------------------------------------------------------------------------
# Local graphs (entry pages)
# --------------------------------------------------------------------------------------------


@dataclass
class Placed:
    node: Node
    column: int  # -HOPS .. HOPS: ancestors left, the entry at 0, descendants right
    row: int
    x: float = 0.0
    y: float = 0.0


@dataclass
class LocalGraph:
    centre: str
    placed: dict[str, Placed]
    edges: list[tuple[str, str]]
    hidden: dict[int, int] = field(default_factory=dict)  # column -> entries not drawn
    width: float = 0.0
    height: float = 0.0


def _distances(start: str, step: Mapping[str, Sequence[str]], hops: int) -> dict[str, int]:
    dist, frontier = {start: 0}, [start]
    for d in range(1, hops + 1):
        nxt = []
        for i in frontier:
            for j in step.get(i, ()):
                if j not in dist:
                    dist[j] = d
                    nxt.append(j)
        frontier = nxt
    return dist


def local_graph(
    centre: str,
    nodes: Mapping[str, Node],
    parents: Mapping[str, Sequence[str]],
    children: Mapping[str, Sequence[str]],
    hops: int = HOPS,
    max_per_column: int = MAX_PER_COLUMN,
) -> LocalGraph | None:
    """Ancestors and descendants of ``centre`` within ``hops`` links, one column per distance; None
    when it has neither. A column keeps at most ``max_per_column`` entries: those linked to more of the
    entries already kept, then the earliest; a farther column keeps only entries linked to a kept one."""
    up = _distances(centre, parents, hops)
    down = _distances(centre, children, hops)
    if len(up) == 1 and len(down) == 1:
        return None
    kept: dict[str, int] = {centre: 0}
    hidden: dict[int, int] = {}
    for sign, dist, near in ((-1, up, children), (1, down, parents)):
        for d in range(1, hops + 1):
            ring = [i for i, k in dist.items() if k == d]
            # only entries reached through one that is drawn (a farther column hangs on the nearer)
            ring = [i for i in ring if any(kept.get(j) == sign * (d - 1) for j in near.get(i, ()))]
            # linked to more of what is drawn, then more influential (built upon more), then earlier
            ring.sort(key=lambda i: (-sum(j in kept for j in near.get(i, ())), -len(children.get(i, ())),
                                     nodes[i].year, nodes[i].name))
            for i in ring[:max_per_column]:
                kept[i] = sign * d
            if len(ring) > max_per_column:
                hidden[sign * d] = len(ring) - max_per_column
    columns: dict[int, list[str]] = {}
    for i, c in kept.items():
        columns.setdefault(c, []).append(i)
    placed: dict[str, Placed] = {}
    order = sorted(columns)
    rows = max(len(v) + (1 if c in hidden else 0) for c, v in columns.items())
    height = rows * (NODE_H + ROW_GAP) - ROW_GAP
    # Rows: outwards from the entry, each column ordered by the mean row of its links in the column
    # nearer the entry (fewer crossings), then by year.
    row_of: dict[str, float] = {centre: 0.0}
    for c in sorted(columns, key=abs):
        if c == 0:
            continue
        inner, inner_column = (children, c + 1) if c < 0 else (parents, c - 1)
        keys = {}
        for i in columns[c]:
            linked = [row_of[j] for j in inner.get(i, ()) if kept.get(j) == inner_column]
            keys[i] = (sum(linked) / len(linked) if linked else 0.0, nodes[i].year, nodes[i].name.lower())
        columns[c].sort(key=keys.__getitem__)
        row_of.update({i: float(r) for r, i in enumerate(columns[c])})
    x_of = {c: k for k, c in enumerate(order)}
    for c in order:
        x_index, ids = x_of[c], columns[c]
        n = len(ids) + (1 if c in hidden else 0)
        top = (height - (n * (NODE_H + ROW_GAP) - ROW_GAP)) / 2
        for r, i in enumerate(ids):
            placed[i] = Placed(nodes[i], c, r, x_index * (NODE_W + COL_GAP), top + r * (NODE_H + ROW_GAP))
    edges = [
        (p, c) for c in placed for p in parents.get(c, ()) if p in placed and placed[p].column < placed[c].column
    ]
    width = len(order) * (NODE_W + COL_GAP) - COL_GAP
    return LocalGraph(centre, placed, edges, hidden, width, height)


def local_html(
    g: LocalGraph, url_of: Callable[[str], str], colours: Mapping[str | None, str], more_href: str = "#lineage"
) -> str:
    """The local graph as HTML: boxes (links to the entries' pages, the entry itself filled) placed over
    an SVG layer that draws the arrows from what an entry builds on to what builds on it. Links are HTML,
    not SVG, so that mkdocs-material's instant navigation handles them. Catalog text is escaped; colours
    and positions are numbers and palette entries computed here."""
    out = [
        f'<div class="lineage-local" style="width: {g.width:.0f}px; height: {g.height:.0f}px" role="group" '
        f'aria-label="What this entry builds on and what builds on it, within {HOPS} links">',
        f'<svg class="lineage-edges" width="{g.width:.0f}" height="{g.height:.0f}" aria-hidden="true">'
        '<defs><marker id="lineage-arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="currentColor"/></marker></defs>',
    ]
    for p, c in g.edges:
        a, b = g.placed[p], g.placed[c]
        x1, y1 = a.x + NODE_W, a.y + NODE_H / 2
        x2, y2 = b.x - 1, b.y + NODE_H / 2
        mid = (x1 + x2) / 2
        out.append(
            f'<path d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
            'marker-end="url(#lineage-arrow)"/>'
        )
    out.append("</svg>")
    for i, pl in g.placed.items():
        n = pl.node
        colour = colours.get(n.family, NO_FAMILY)
        where = f"left: {pl.x:.0f}px; top: {pl.y:.0f}px; width: {NODE_W}px; height: {NODE_H}px; border-color: {colour}"
        tip = escape(f"{n.name} ({n.year}): {n.title}")
        year = "" if n.name.endswith(str(n.year)) else f' <span class="lineage-year">{n.year}</span>'
        label = f"{escape(n.name)}{year}"
        if i == g.centre:
            out.append(
                f'<span class="lineage-node lineage-centre" style="{where}; background: {colour}; '
                f'color: {text_colour(colour)}" title="{tip}">{label}</span>'
            )
        else:
            out.append(f'<a class="lineage-node" style="{where}" href="{escape(url_of(i))}" title="{tip}">{label}</a>')
    for column, count in sorted(g.hidden.items()):
        x = next(pl.x for pl in g.placed.values() if pl.column == column)
        top = max(pl.y for pl in g.placed.values() if pl.column == column) + NODE_H + ROW_GAP
        out.append(
            f'<a class="lineage-more" style="left: {x:.0f}px; top: {top:.0f}px; width: {NODE_W}px; '
            f'height: {NODE_H}px" href="{escape(more_href)}">+ {count} more</a>'
        )
    out.append("</div>")
    return "".join(out)
