"""Comparison tables of the site: the columns of the properties matrix and the values its filters match.

The matrix has one column per property of ``taxonomy/properties.yaml``. Its headers are short (the
matrix is wide) and carry the property's name and description for hover; each row carries its values as
``data-p-<property>`` attributes, which the filters on the page (``site/assets/js/property-filters.js``)
compare with the chosen values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Header labels for the matrix; a property not listed here shows its full name.
SHORT_HEADERS = {
    "negatives": "Neg.",
    "memory": "Memory",
    "momentum_encoder": "EMA",
    "predictor": "Pred.",
    "stop_gradient": "Stop-grad",
    "projector": "Proj.",
    "multi_crop": "Multi-crop",
    "prototypes": "Proto.",
    "masking": "Mask",
    "reconstruction_target": "Target",
    "uses_labels": "Labels",
    "collapse_prevention": "Anti-collapse",
    "batch_size_sensitivity": "Batch sens.",
}

UNKNOWN = "unknown"


@dataclass(frozen=True)
class PropertyColumn:
    id: str
    name: str
    short: str  # the header
    hover: str  # "Name: description", shown on hover
    type: str  # "bool" or "enum"
    choices: list[tuple[str, str]]  # (filter value, label) for the filter's options


def property_columns(properties: list[Any]) -> list[PropertyColumn]:
    """The matrix's property columns, in taxonomy order."""
    out = []
    for p in properties:
        if p.type == "bool":
            choices = [("yes", "yes"), ("no", "no")]
        else:
            choices = [(v, v.replace("_", " ")) for v in p.values]
        hover = f"{p.name}: {p.description}"
        out.append(PropertyColumn(p.id, p.name, SHORT_HEADERS.get(p.id, p.name), hover, p.type, choices))
    return out


def facet(value: Any) -> str:
    """A property value as the filters match it: yes / no / the enum value / unknown."""
    if value is None:
        return UNKNOWN
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return str(value)


def facets(entry: Any, columns: list[PropertyColumn]) -> dict[str, str]:
    return {c.id: facet(entry.properties.get(c.id)) for c in columns}
