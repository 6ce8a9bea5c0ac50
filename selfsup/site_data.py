"""The site's data files: what its scripts load on the pages that need them (never on every page).

Each is a script that sets one ``window`` variable, not a JSON file, because browsers refuse fetch() on
file:// pages: ``assets/generated/lineage-data.js`` (the lineage graph, ``site_lineage.graph_data``),
``papers-data.js`` (the paper index's export) and ``methods-data.js`` (the compare page).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selfsup.site import SiteModel

PAPERS_FILE = "assets/generated/papers-data.js"
METHODS_FILE = "assets/generated/methods-data.js"
COMPARE_PAGE = "compare/methods.md"


def script(data: dict | list, name: str) -> str:
    """``window.<name> = <data>;``. ``<``, ``>`` and ``&`` are escaped, so no catalog string can end a
    script element wherever the text is embedded."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"window.{name} = {text};\n"


def papers_export(model: SiteModel) -> list[dict[str, Any]]:
    """One record per entry, in the index's order: the facts of the catalog and its BibTeX (the paper
    index exports the rows its filters show as BibTeX, CSV or JSON)."""
    return [
        {
            "id": e.id, "name": v.name, "title": v.title_text, "authors": e.authors, "year": e.year,
            "venue": e.venue, "arxiv": e.arxiv, "doi": e.doi, "url": e.url, "code": e.code, "kind": e.kind,
            "family": e.family, "subfamily": e.subfamily, "modalities": e.modalities,
            "implementation": e.implementation, "bibtex": v.bibtex,
        }
        for v in model.entries
        for e in [v.entry]
    ]


def methods_compare(model: SiteModel, url_of: Callable[[str], str]) -> dict[str, Any]:
    """The comparison properties (id, name), and per method entry: facts, property values, objective,
    reported and measured results, code. ``url_of(page)`` is a page's URL from the compare page."""
    out = []
    for v in model.methods:
        e = v.entry
        page = url_of(v.page)
        out.append({
            "id": e.id, "name": v.name, "title": v.title_text, "year": e.year, "url": page,
            "family": v.family["name"] if v.family else None,
            "subfamily": v.subfamily["name"] if v.subfamily else None,
            "key_idea": e.key_idea, "loss_latex": e.loss_latex,
            "properties": {pv.prop.id: pv.text for pv in v.properties},
            "reported": [
                {"benchmark": b["name"], "metric": r.metric, "value": r.value, "backbone": r.backbone,
                 "epochs": r.epochs, "data": model.pretrain_names.get(r.pretrain_data or ""),
                 "labels": r.pretrain_labels, "source": r.source}
                for r, b in v.results
            ],
            "measured": [
                {"benchmark": ms.data.title, "backbone": row.backbone, "knn_top1": row.knn_top1,
                 "random_init_knn_top1": row.random_init_knn_top1, "linear_top1": row.linear_top1}
                for ms, row in v.measured
                if row.knn_top1 is not None
            ],
            "implementation": e.implementation,
            "code_url": f"{page}#implementation" if e.implementation else None,
            "official_code": e.code,
        })
    return {"properties": [{"id": p.id, "name": p.name} for p in model.taxonomy.properties], "methods": out}
