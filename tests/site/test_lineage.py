"""The lineage model: the whole graph's data and each entry's local graph (selfsup/site_lineage.py)."""

from __future__ import annotations

import json
import re

from selfsup import site_data
from selfsup import site_lineage as sl


def node(i: str, year: int = 2020, family: str | None = "contrastive", name: str | None = None) -> sl.Node:
    return sl.Node(i, name or i.upper(), year, family, "method", ("image",), f"Title of {i}")


def graph(links: dict[str, list[str]], years: dict[str, int] | None = None):
    """links: child -> parents. Returns (nodes, parents, children)."""
    ids = set(links) | {p for ps in links.values() for p in ps}
    nodes = {i: node(i, (years or {}).get(i, 2020)) for i in ids}
    parents = {i: list(links.get(i, [])) for i in ids}
    children: dict[str, list[str]] = {i: [] for i in ids}
    for c, ps in parents.items():
        for p in ps:
            children[p].append(c)
    return nodes, parents, children


def test_local_graph_columns_are_distances():
    # a -> b -> c -> d -> e -> f, and z -> a: from c, two links each way
    nodes, parents, children = graph({"b": ["a"], "c": ["b"], "d": ["c"], "e": ["d"], "f": ["e"], "a": ["z"]})
    g = sl.local_graph("c", nodes, parents, children)
    assert {i: p.column for i, p in g.placed.items()} == {"a": -2, "b": -1, "c": 0, "d": 1, "e": 2}
    assert sorted(g.edges) == [("a", "b"), ("b", "c"), ("c", "d"), ("d", "e")]
    assert g.hidden == {}
    xs = sorted({p.x for p in g.placed.values()})
    assert len(xs) == 5 and g.width == xs[-1] + sl.NODE_W


def test_local_graph_none_without_links():
    nodes, parents, children = graph({"b": ["a"]})
    nodes["lonely"] = node("lonely")
    assert sl.local_graph("lonely", nodes, parents, children) is None


def test_local_graph_caps_a_column_and_keeps_the_influential():
    links = {f"c{k}": ["hub"] for k in range(12)}
    links["g0"] = ["c11"]  # c11 is built upon: it must be among the kept ones despite its name
    links["g1"] = ["c11"]
    nodes, parents, children = graph(links)
    g = sl.local_graph("hub", nodes, parents, children, max_per_column=8)
    kept = [i for i, p in g.placed.items() if p.column == 1]
    assert len(kept) == 8 and "c11" in kept
    assert g.hidden == {1: 4}
    assert {i for i, p in g.placed.items() if p.column == 2} == {"g0", "g1"}


def test_local_graph_draws_no_edge_within_a_column():
    # b builds on a and on c; c builds on a: from b, a and c are both parents (distance 1)
    nodes, parents, children = graph({"b": ["a", "c"], "c": ["a"]})
    g = sl.local_graph("b", nodes, parents, children)
    assert g.placed["a"].column == g.placed["c"].column == -1
    assert all(g.placed[p].column < g.placed[c].column for p, c in g.edges)
    assert ("a", "c") not in g.edges


def test_local_html_escapes_catalog_text_and_links_every_other_entry():
    hostile = '<script>alert(1)</script>"'
    nodes, parents, children = graph({"b": ["a"]})
    nodes["a"] = sl.Node("a", hostile, 2019, None, "method", (), hostile)
    g = sl.local_graph("b", nodes, parents, children)
    html = sl.local_html(g, lambda i: f"../{i}/", sl.family_colours(["contrastive"]))
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="../a/"' in html and 'href="../b/"' not in html  # the entry itself is not a link
    assert 'class="lineage-node lineage-centre"' in html
    assert len(re.findall(r"marker-end=", html)) == 1  # one arrow


def test_graph_data_holds_connected_entries_and_used_vocabularies():
    nodes = [node("a", 2019), node("b", 2020, family="distillation"), node("alone", 2021)]
    data = sl.graph_data(
        nodes, [("a", "b")], [("contrastive", "Contrastive"), ("distillation", "Distillation"), ("x", "X")],
        [("image", "Images"), ("video", "Video")], [("method", "Method"), ("analysis", "Analysis")],
        lambda i: f"papers/{i}/",
    )
    assert [n["id"] for n in data["nodes"]] == ["a", "b"]
    assert [f["id"] for f in data["families"]] == ["contrastive", "distillation"]
    assert [m["id"] for m in data["modalities"]] == ["image"]
    assert [k["id"] for k in data["kinds"]] == ["method"]
    assert data["edges"] == [["a", "b"]] and data["nodes"][1]["url"] == "papers/b/"
    colours = [f["colour"] for f in data["families"]]
    assert len(set(colours)) == len(colours)


def test_data_script_escapes_markup_and_round_trips():
    data = {"nodes": [{"name": "</script><b>&"}]}
    text = site_data.script(data, "SELFSUP_LINEAGE")
    assert "<" not in text and ">" not in text and "&" not in text
    prefix = "window.SELFSUP_LINEAGE = "
    assert text.startswith(prefix)
    assert json.loads(text[len(prefix):].rstrip().rstrip(";")) == data


def test_text_colour_keeps_contrast():
    assert sl.text_colour("#0072B2") == "#ffffff"
    assert sl.text_colour("#E69F00") == "#111111"
