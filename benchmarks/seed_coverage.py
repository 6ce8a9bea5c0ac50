#!/usr/bin/env python3
"""How many of the seed papers have a catalog entry?

The catalog is built from two seed files in ``../shared/seeds`` (relative to the repository root):

* ``000_*.txt``: a list of papers copied from a paper-aggregator page. Each paper is a title line, a
  blank line, the abstract, and a trailer ``• N authors`` (or an organisation name), ``·`` and a date.
* ``001_*.txt``: a researcher's reading notes under year headings. Each paper is one citation line,
  optionally prefixed with ``- ``, followed by bullet notes. Three citation styles occur:

  - APA:      ``Surname, I., Surname, I., & Surname, I. (2020[, Month]). Title. Venue.``
  - Chicago:  ``Surname, First, First Surname, and First Surname. “Title.” Venue (2019).`` (the year in
    parentheses, or at the end as ``pp. 1-10. 2019.``; titles may contain nested “quotes”)
  - IEEE:     ``I. Surname, I. Surname, and I. Surname, ‘‘Title,’’ in Proc. CVPR, Jun. 2011, ...``

The script parses the distinct papers of both files (deduplicated within and across files by normalised
title), matches each to a catalog entry by normalised title (exact, difflib ratio >= 0.9, or one title a
word-prefix of the other, for subtitles), prints the counts and every seed paper without an entry, and
exits with status 1 when any is missing.

Usage::

    python benchmarks/seed_coverage.py [SEED_FILE ...] [--catalog-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS_DIR = ROOT.parent / "shared" / "seeds"

MATCH_RATIO = 0.9  # difflib ratio for a seed title to match a catalog title
DEDUPE_RATIO = 0.95  # stricter ratio for treating two seed citations as the same paper
MIN_PREFIX_CHARS = 20  # a title shorter than this never matches by prefix

YEAR = r"(?:19[5-9]\d|20[0-4]\d)"


@dataclass
class SeedPaper:
    """One paper named in a seed file."""

    file: str
    line: int
    title: str
    year: int | None = None
    authors: list[str] = field(default_factory=list)  # surnames, when the file gives them
    author_count: int | None = None
    date: str | None = None
    style: str = ""  # "listing" (file 000), "apa", "chicago", "ieee"
    duplicates: list[int] = field(default_factory=list)  # further lines naming the same paper

    @property
    def key(self) -> str:
        return normalize_title(self.title)


# --------------------------------------------------------------------------------------------
# Titles
# --------------------------------------------------------------------------------------------


def normalize_title(title: str) -> str:
    """Lowercase ASCII words separated by single spaces: accents, punctuation and dashes dropped."""
    text = unicodedata.normalize("NFKD", title)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.lower().replace("'", "").replace("’", "")
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return text.strip()


def titles_match(a: str, b: str, ratio: float = MATCH_RATIO) -> bool:
    """Whether two normalised titles name the same paper (small differences and subtitles allowed)."""
    if not a or not b:
        return False
    if a == b:
        return True
    short, long_ = sorted((a, b), key=len)
    if len(short) >= MIN_PREFIX_CHARS and long_.startswith(short + " "):
        return True
    if 2.0 * len(short) / (len(short) + len(long_)) < ratio:  # upper bound on the ratio
        return False
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return sm.quick_ratio() >= ratio and sm.ratio() >= ratio


# --------------------------------------------------------------------------------------------
# File 000: paper listing
# --------------------------------------------------------------------------------------------

AUTHORS_LINE = re.compile(r"^\s*•\s*(\d+)\s+authors?\s*$")
DOT_LINE = re.compile(r"^\s*·\s*$")


def parse_listing(text: str, name: str = "000") -> list[SeedPaper]:
    """Papers of a listing: the title line before each abstract, with its author count and date.

    Every paper ends with a line holding only ``·`` between the author line (``• N authors`` or an
    organisation) and the date line. Walking back from it: author line, abstract, title.
    """
    lines = text.splitlines()
    papers: list[SeedPaper] = []

    def prev_nonblank(i: int) -> int:
        i -= 1
        while i >= 0 and not lines[i].strip():
            i -= 1
        return i

    for i, line in enumerate(lines):
        if not DOT_LINE.match(line):
            continue
        a = prev_nonblank(i)  # "• N authors" or an organisation
        ab = prev_nonblank(a)  # abstract
        t = prev_nonblank(ab)  # title
        if a < 0 or ab < 0 or t < 0:
            continue
        # The "title" must not be the previous paper's date (that means this paper has no title line).
        if t > 0 and DOT_LINE.match(lines[prev_nonblank(t)] if prev_nonblank(t) >= 0 else ""):
            continue
        title = lines[t].strip()
        if not title or len(title) > 400:
            continue
        m = AUTHORS_LINE.match(lines[a])
        date = next((lines[j].strip() for j in range(i + 1, len(lines)) if lines[j].strip()), None)
        year = None
        if date:
            ym = re.search(rf"\b({YEAR})\b", date)
            year = int(ym.group(1)) if ym else None
        papers.append(
            SeedPaper(
                file=name,
                line=t + 1,
                title=title,
                year=year,
                author_count=int(m.group(1)) if m else None,
                date=date,
                style="listing",
            )
        )
    return papers


# --------------------------------------------------------------------------------------------
# File 001: citations
# --------------------------------------------------------------------------------------------

APA = re.compile(
    rf"^(?P<authors>.+?)\s*\((?P<year>{YEAR})[a-z]?(?:,\s*[^)]*)?\)\s*\.?\s*(?P<rest>\S.*)$"
)
APA_AUTHOR = re.compile(r"([^\s,&…][^,&…]*?),\s+((?:[A-Z][a-z]?\.\s?-?\s?)+)")
ABBREVIATIONS = {"vs", "e.g", "i.e", "al", "etc", "fig", "no", "vol", "st", "dr", "mr"}


def _apa_title(rest: str) -> str:
    """The title at the start of an APA remainder: up to the first full stop that ends a sentence.

    '?' or '!' followed by a lowercase word continues the title ("...samples? a unified ...").
    """
    for m in re.finditer(r"([.?!])\.?(?=\s|$)", rest):
        end = m.start(1)
        before = rest[:end]
        last_word = before.rsplit(" ", 1)[-1].lower()
        after = rest[m.end():].lstrip()
        if m.group(1) == ".":
            if last_word in ABBREVIATIONS or re.fullmatch(r"[a-z]", last_word):
                continue
            return before.strip()
        # '?' or '!'
        if rest[m.start(1) + 1: m.start(1) + 2] == "." or not after or not after[0].islower():
            return rest[: end + 1].strip()
    return rest.strip().rstrip(".")


def _chicago_title(s: str) -> tuple[str, int] | None:
    """Title between “ and the closing ” that follows punctuation (nested “quotes” are kept)."""
    start = s.find("“")
    if start < 0:
        return None
    m = re.search(r"[.,?!]”", s[start + 1:])
    if m:
        end = start + 1 + m.start() + 1
        title = s[start + 1: end]
        close = end + 1
    else:
        end = s.rfind("”")
        if end <= start:
            return None
        title = s[start + 1: end]
        close = end + 1
    title = title.strip().rstrip(".,").strip()
    return title, close


def _year_after(tail: str) -> int | None:
    """The publication year in a citation's tail: '(2019)' first, then a trailing '2019.', then any."""
    m = re.search(rf"\(({YEAR})[a-z]?\)", tail)
    if m:
        return int(m.group(1))
    m = re.search(rf"\b({YEAR})[a-z]?\.?\s*$", tail)
    if m:
        return int(m.group(1))
    found = re.findall(rf"(?<![\d.:/-])({YEAR})(?![\d.-]?\d)", tail)
    return int(found[-1]) if found else None


def _surnames_full_names(head: str) -> list[str]:
    """Surnames from 'Surname, First, First Surname, and First Surname' (Chicago)."""
    head = head.strip().rstrip(".,").strip()
    parts = [p.strip() for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", head) if p.strip()]
    if not parts:
        return []
    names = [parts[0]]
    for p in parts[2:]:
        names.append(_surname_of(p))
    return [n for n in names if n]


PARTICLES = {"de", "van", "der", "den", "von", "da", "di", "la", "le", "du", "del", "dos", "ter"}


def _surname_of(full_name: str) -> str:
    """'Shalini De Mello' -> 'De Mello', 'Laurens Van Der Maaten' -> 'Van Der Maaten'."""
    words = full_name.split()
    if not words:
        return ""
    i = len(words) - 1
    while i > 1 and words[i - 1].lower() in PARTICLES:
        i -= 1
    return " ".join(words[i:])


def _surnames_initials_first(head: str) -> list[str]:
    """Surnames from 'G. W. Taylor, I. Spiro, and R. Fergus' (IEEE)."""
    head = head.strip().rstrip(".,").strip()
    parts = [p.strip() for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", head) if p.strip()]
    return [_surname_of(p) for p in parts if p.split()]


AUTHOR_START = re.compile(r"^[A-ZÀ-Ý][^\s,“”]*(?:[ \-][A-Za-zÀ-ÿ'’\-]+)*,\s")


def parse_citation(line: str) -> tuple[str, str, int | None, list[str]] | None:
    """(style, title, year, surnames) for a citation line, or None for a note."""
    s = re.sub(r"^\s*(?:[-•*]\s*)+", "", line).strip()
    if len(s) < 20:
        return None
    # IEEE: ‘‘Title,’’
    if "‘‘" in s and "’’" in s:
        head, _, rest = s.partition("‘‘")
        title, _, tail = rest.partition("’’")
        title = title.strip().rstrip(".,").strip()
        if title and re.search(r"[A-Za-z]", head):
            return "ieee", title, _year_after(tail), _surnames_initials_first(head)
    # Chicago: Names. “Title.” Venue ... year
    if "“" in s and AUTHOR_START.match(s):
        got = _chicago_title(s)
        if got:
            title, close = got
            head = s[: s.find("“")]
            year = _year_after(s[close:])
            if title and year is not None:
                return "chicago", title, year, _surnames_full_names(head)
    # APA: Names (Year). Title. Venue.
    m = APA.match(s)
    if m and AUTHOR_START.match(s):
        authors = [a.strip() for a, _ in APA_AUTHOR.findall(m.group("authors"))]
        if authors:
            title = _apa_title(m.group("rest"))
            if title:
                return "apa", title, int(m.group("year")), authors
    return None


def parse_citations(text: str, name: str = "001") -> list[SeedPaper]:
    papers = []
    for i, line in enumerate(text.splitlines(), 1):
        got = parse_citation(line)
        if got:
            style, title, year, authors = got
            papers.append(SeedPaper(file=name, line=i, title=title, year=year, authors=authors, style=style))
    return papers


# --------------------------------------------------------------------------------------------
# Both files
# --------------------------------------------------------------------------------------------


def is_listing(text: str) -> bool:
    return sum(1 for line in text.splitlines() if AUTHORS_LINE.match(line)) >= 1


def parse_seed_file(path: Path) -> list[SeedPaper]:
    text = path.read_text(encoding="utf-8")
    name = path.name
    return parse_listing(text, name) if is_listing(text) else parse_citations(text, name)


def dedupe(papers: list[SeedPaper]) -> list[SeedPaper]:
    """One paper per title: later citations of the same title are folded into the first."""
    kept: list[SeedPaper] = []
    by_key: dict[str, SeedPaper] = {}
    for p in papers:
        key = p.key
        if not key:
            continue
        same = by_key.get(key)
        if same is None:
            same = next((q for q in kept if titles_match(q.key, key, DEDUPE_RATIO)), None)
        if same is not None:
            same.duplicates.append(p.line)
            by_key[key] = same
            continue
        kept.append(p)
        by_key[key] = p
    return kept


def default_seed_files() -> list[Path]:
    files = []
    for pattern in ("000_*.txt", "001_*.txt"):
        files.extend(sorted(SEEDS_DIR.glob(pattern)))
    return files


def catalog_titles(catalog_dir: Path) -> dict[str, list[str]]:
    """id -> [title, former titles...] for every catalog file with a title (entries with other problems still
    count); a paper published under a new title is still cited under its arXiv one."""
    try:
        from selfsup.catalog import read_yaml
    except ImportError:  # running without the package installed
        sys.path.insert(0, str(ROOT))
        from selfsup.catalog import read_yaml

    out = {}
    for path in sorted(catalog_dir.glob("*.yaml")):
        data, problem = read_yaml(path)
        if problem or not isinstance(data, dict) or not isinstance(data.get("title"), str):
            continue
        former = data.get("former_titles") if isinstance(data.get("former_titles"), list) else []
        out[str(data.get("id") or path.stem)] = [data["title"], *(f for f in former if isinstance(f, str))]
    return out


def match(papers: list[SeedPaper], titles: dict[str, list[str]]) -> dict[int, str | None]:
    """index in papers -> matching catalog id (or None); an entry matches by its title or a former one."""
    norm = [(eid, normalize_title(t)) for eid, ts in titles.items() for t in ts]
    exact: dict[str, str] = {}
    for eid, t in norm:
        exact.setdefault(t, eid)
    result: dict[int, str | None] = {}
    for i, p in enumerate(papers):
        key = p.key
        eid = exact.get(key)
        if eid is None:
            eid = next((e for e, t in norm if titles_match(key, t)), None)
        result[i] = eid
    return result


def coverage(seed_files: list[Path], catalog_dir: Path) -> dict:
    per_file: dict[str, int] = {}
    everything: list[SeedPaper] = []
    for f in seed_files:
        parsed = dedupe(parse_seed_file(f))
        per_file[f.name] = len(parsed)
        everything.extend(parsed)
    papers = dedupe(everything)
    titles = catalog_titles(catalog_dir)
    matched = match(papers, titles)
    missing = [papers[i] for i, eid in matched.items() if eid is None]
    return {
        "seed_papers": len(papers),
        "per_file": per_file,
        "matched": len(papers) - len(missing),
        "missing": [asdict(p) for p in missing],
        "matches": [
            {"file": papers[i].file, "line": papers[i].line, "title": papers[i].title, "id": eid}
            for i, eid in matched.items()
            if eid is not None
        ],
        "catalog_entries": len(titles),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seed_files", nargs="*", type=Path, help="seed files (default: ../shared/seeds/000_*.txt and 001_*.txt)")
    ap.add_argument("--catalog-dir", type=Path, default=ROOT / "catalog")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)

    files = args.seed_files or default_seed_files()
    if not files:
        print(f"no seed files given and none found under {SEEDS_DIR}", file=sys.stderr)
        return 2
    for f in files:
        if not f.is_file():
            print(f"seed file not found: {f}", file=sys.stderr)
            return 2
    report = coverage(files, args.catalog_dir)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        per = ", ".join(f"{name}: {n}" for name, n in report["per_file"].items())
        print(f"seed papers: {report['seed_papers']} ({per})")
        print(f"matched:     {report['matched']}")
        print(f"missing:     {len(report['missing'])}")
        for p in report["missing"]:
            year = f" ({p['year']})" if p["year"] else ""
            print(f"  {p['file']}:{p['line']}: {p['title']}{year}")
    return 1 if report["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
