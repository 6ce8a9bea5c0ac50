"""Catalog prose is in the project's own words: no summary, key idea or note repeats a run of 8 or more words
of a seed abstract or of the seed reading notes. Titles and citations are excepted: an entry may name a paper."""

import re

import pytest

from selfsup import catalog as cat

SEEDS = cat.ROOT.parent / "shared" / "seeds"
RUN = 8
FIELDS = ("summary", "key_idea", "notes")
# "Xie et al. 2016", "(Yang et al., 2016)", "Chen and He (2021)": a citation names a paper, it is not prose.
CITATION = re.compile(r"\(?\b[A-Z][\w'-]+(?: (?:and|&) [A-Z][\w'-]+| et al\.?),? \(?\d{4}[a-z]?\)?\)?")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower())


def grams(text: str, n: int = RUN) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def shared_runs(text: str, source: set[tuple[str, ...]], excepted: set[tuple[str, ...]] = frozenset(),
                n: int = RUN) -> list[str]:
    """The maximal runs of >= n consecutive words of ``text`` whose every n-gram is in ``source`` (and not in
    ``excepted``: titles), after citations are taken out."""
    w = words(CITATION.sub(" | ", text))
    hit = [tuple(w[i : i + n]) in source and tuple(w[i : i + n]) not in excepted for i in range(len(w) - n + 1)]
    runs, i = [], 0
    while i < len(hit):
        if not hit[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(hit) and hit[j + 1]:
            j += 1
        runs.append(" ".join(w[i : j + n]))
        i = j + 1
    return runs


def prose(entry) -> dict[str, str]:
    out = {}
    for field in FIELDS:
        value = getattr(entry, field, None)
        if value:
            out[field] = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return out


def test_shared_runs_finds_a_copied_run_and_spares_titles_and_citations():
    source = grams("we show that the hardest negatives are neither necessary nor sufficient for good features")
    copied = "Here the hardest negatives are neither necessary nor sufficient for good features, it says."
    assert shared_runs(copied, source) == ["the hardest negatives are neither necessary nor sufficient for good features"]
    assert shared_runs("Hard negatives are necessary, and some are sufficient, for features.", source) == []
    title = grams("The Hardest Negatives Are Neither Necessary Nor Sufficient For Good Features")
    assert shared_runs(copied, source, excepted=title) == []
    cited = grams("deep embedded clustering xie et al 2016 and the deep clustering network of yang")
    assert shared_runs("Deep embedded clustering (Xie et al. 2016) and the deep clustering network of Yang", cited) == []


@pytest.mark.skipif(not SEEDS.is_dir(), reason=f"the seed texts are not here ({SEEDS} is absent)")
def test_no_entry_repeats_eight_words_of_the_seeds():
    catalog = cat.load_catalog(cat.ROOT)
    source: set[tuple[str, ...]] = set()
    for path in sorted(SEEDS.glob("*.txt")):
        source |= grams(path.read_text(encoding="utf-8"))
    assert source, f"no seed text read from {SEEDS}"
    titles: set[tuple[str, ...]] = set()
    for e in catalog:
        for title in (e.title, *e.former_titles):
            titles |= grams(title)
    found = [f"{e.id}.{field}: {run!r}" for e in catalog.sorted() for field, text in prose(e).items()
             for run in shared_runs(text, source, titles)]
    assert not found, f"{len(found)} run(s) of {RUN}+ words copied from the seeds:\n" + "\n".join(found)
