"""Search tuning of the site: plain-text titles and the keywords that mkdocs-material's search weights highest.

mkdocs-material's lunr index has three fields: ``title`` (boost 1e3), ``text`` (1) and ``tags`` (1e6).
An entry page lists its keywords as front-matter ``tags`` (never shown: there is no tags plugin, and the
site's CSS hides them in search results): the method's name and id, the catalog tags, and the synonyms a
reader may type for its mechanism (MIM, negative-free, self-distillation, ...). A query that names a method
or a mechanism so ranks the method's page above the family pages, whose words are only title and body.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Inline math in titles: $...$ or \(...\).
_MATH = re.compile(r"\$([^$]*)\$|\\\((.*?)\\\)")
_SUPERSCRIPT = str.maketrans("0123456789+-=()ni", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ")
_SUBSCRIPT = str.maketrans("0123456789+-=()", "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎")
_GREEK = {
    "alpha": "α",
    "beta": "β",
    "gamma": "γ",
    "delta": "δ",
    "epsilon": "ε",
    "theta": "θ",
    "lambda": "λ",
    "mu": "μ",
    "pi": "π",
    "rho": "ρ",
    "sigma": "σ",
    "tau": "τ",
    "phi": "φ",
    "chi": "χ",
    "psi": "ψ",
    "omega": "ω",
    "Delta": "Δ",
    "Sigma": "Σ",
    "Omega": "Ω",
    "times": "×",
    "cdot": "·",
    "infty": "∞",
}


def _script(text: str, table: dict[int, str], mark: str) -> str:
    """Digits and signs as Unicode super/subscripts; anything else keeps a ``^``/``_`` in front."""
    mapped = text.translate(table)
    return mapped if all(ord(c) > 127 for c in mapped) else mark + text


def _plain_math(latex: str) -> str:
    text = re.sub(r"\\([A-Za-z]+)\s*", lambda m: _GREEK.get(m.group(1), ""), latex)
    text = re.sub(
        r"\^\{([^{}]*)\}|\^(.)", lambda m: _script(m.group(1) or m.group(2), _SUPERSCRIPT, "^"), text
    )
    text = re.sub(r"_\{([^{}]*)\}|_(.)", lambda m: _script(m.group(1) or m.group(2), _SUBSCRIPT, "_"), text)
    return text.replace("{", "").replace("}", "").strip()


def plain_text(value: str) -> str:
    """A title as plain text: inline math becomes Unicode ("AstroM$^3$" -> "AstroM³"), for <title>, the
    heading and the search index, which cannot render math."""
    text = _MATH.sub(lambda m: _plain_math(m.group(1) if m.group(1) is not None else m.group(2)), value)
    return " ".join(text.split())


# Synonyms a reader may search for, per mechanism. The keys are what the catalog says (a tag, a family or
# sub-family id, a property); each alias is indexed with the page's keywords.
SYNONYMS: dict[str, list[str]] = {
    "masked-image-modeling": ["MIM", "masked image modeling", "masked image modelling"],
    "masked-modeling": ["masked modeling", "masked modelling", "masked prediction"],
    "non-contrastive": ["non-contrastive", "negative-free", "no negatives", "without negatives"],
    "self-distillation": ["self-distillation", "teacher-student", "student teacher"],
    "momentum-encoder": ["momentum encoder", "EMA teacher", "exponential moving average", "mean teacher"],
    "contrastive": ["contrastive", "InfoNCE", "instance discrimination"],
    "clustering": ["clustering", "prototypes", "pseudo-labels"],
    "decorrelation": ["redundancy reduction", "decorrelation", "whitening", "CCA"],
    "pretext-task": ["pretext task", "proxy task"],
    "multi-crop": ["multi-crop", "multicrop"],
    "memory-bank": ["memory bank"],
    "queue": ["momentum queue", "negative queue"],
    "stop-gradient": ["stop-gradient", "stopgrad"],
    "supervised-contrastive": ["SupCon", "supervised contrastive"],
}

# Spelling variants: a keyword with the one also gets the other.
_VARIANTS = [("modeling", "modelling"), ("color", "colour"), ("normalization", "normalisation")]


def _words(text: str) -> list[str]:
    """Words as the search index splits them (mkdocs-material's separator: whitespace and hyphens)."""
    return [w for w in re.split(r"[\s\-]+", text.lower()) if w]


def _concepts(entry: Any) -> list[str]:
    """The mechanisms (keys of :data:`SYNONYMS`) an entry has, from its tags, family and properties."""
    props = entry.properties
    tags = set(entry.tags)
    found = [t for t in entry.tags if t in SYNONYMS]
    if entry.family == "masked_modeling" or props.get("masking") is True:
        found.append("masked-image-modeling" if "image" in entry.modalities else "masked-modeling")
    joint_embedding = entry.family in {"distillation", "cca_decorrelation", "clustering"}
    if entry.kind == "method" and joint_embedding and props.get("negatives") is False:
        found.append("non-contrastive")
    if entry.family == "distillation":
        found.append("self-distillation")
    if props.get("momentum_encoder") is True or "ema-teacher" in tags:
        found.append("momentum-encoder")
    family_concept = {
        "contrastive": "contrastive",
        "clustering": "clustering",
        "cca_decorrelation": "decorrelation",
        "pretext_task": "pretext-task",
    }.get(entry.family or "")
    if family_concept:
        found.append(family_concept)
    for prop, concept in [("multi_crop", "multi-crop"), ("stop_gradient", "stop-gradient")]:
        if props.get(prop) is True:
            found.append(concept)
    if props.get("memory") in ("memory_bank", "queue"):
        found.append("memory-bank" if props["memory"] == "memory_bank" else "queue")
    if entry.subfamily == "supervised":
        found.append("supervised-contrastive")
    return list(dict.fromkeys(found))


def keywords(entry: Any, name: str) -> list[str]:
    """The words an entry page is found by, weighted above its body: name, id, authors, catalog tags, the
    titles of earlier versions (a paper is still cited under its arXiv title) and the synonyms of its
    mechanisms; each once, in that order."""
    # The id only where it holds words the name lacks ("rizhko-2025-astrom3" for AstroM3): a repeated
    # word counts twice, and would rank "SimCLR v2" (name and id "simclr-v2") above SimCLR for "simclr".
    words = [
        name,
        *([entry.id] if set(_words(entry.id)) - set(_words(name)) else []),
        *entry.authors,
        *entry.tags,
        *getattr(entry, "former_titles", ()),
    ]
    for concept in _concepts(entry):
        words += SYNONYMS[concept]
    for a, b in _VARIANTS:
        words += [w.replace(a, b) for w in words if a in w] + [w.replace(b, a) for w in words if b in w]
    seen: dict[str, str] = {}
    for w in words:
        w = " ".join(str(w).split())
        if w and w.lower() not in seen:
            seen[w.lower()] = w
    return list(seen.values())


def search_boost(entry: Any, descendants: int) -> float:
    """Per-page weight. Method pages above other papers, implemented methods (the pages with code) above
    the rest, and influential methods (many entries build on them) first: among the pages that a name or
    a mechanism matches equally (SimCLR and SimCLR v2 for "simclr"), the one a reader most likely means."""
    boost = 2.0 if entry.kind == "method" else 1.0
    if entry.implementation:
        boost *= 1.5
    return round(boost * (1 + math.log1p(descendants) / 4), 3)
