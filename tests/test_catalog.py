"""The catalog schema on the real catalog, and located error messages on broken fixtures."""

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from selfsup import catalog as cat

ROOT = cat.ROOT
BROKEN = Path(__file__).parent / "fixtures" / "broken"


def test_real_catalog_validates():
    catalog = cat.load_catalog(ROOT)
    assert catalog.problems == [], "\n".join(map(str, catalog.problems))
    assert len(catalog) >= 20


def test_real_catalog_covers_every_family():
    catalog = cat.load_catalog(ROOT)
    families = {e.family for e in catalog if e.kind == "method"}
    assert set(catalog.taxonomy.family_ids) <= families


def test_every_subfamily_id_is_unique_within_its_family():
    tax = cat.load_taxonomy(ROOT)
    for fam in tax.family_ids:
        subs = tax.subfamily_ids(fam)
        assert len(subs) == len(set(subs)), fam


def test_schema_file_is_up_to_date():
    committed = (ROOT / "schema" / "catalog-entry.schema.json").read_text(encoding="utf-8")
    assert committed == cat.json_schema_text(), "run: selfsup schema -o schema/catalog-entry.schema.json"
    schema = json.loads(committed)
    assert schema["additionalProperties"] is False
    assert {"id", "title", "authors", "year", "kind", "summary", "key_idea"} <= set(schema["required"])


def _problems(case: str) -> list[str]:
    return [str(p) for p in cat.load_catalog(ROOT, BROKEN / case).problems]


F = "tests/fixtures/broken"
EXPECTED = {
    "bad_yaml": [f"{F}/bad_yaml/bad-yaml.yaml:11: malformed YAML: expected ',' or ']', but got ':'"],
    "missing_field": [f"{F}/missing_field/missing-field.yaml: title: required field is missing"],
    "wrong_type": [
        f"{F}/wrong_type/wrong-type.yaml: year: Input should be a valid integer, "
        "unable to parse string as an integer (got 'twenty-twenty')"
    ],
    "unknown_family": [
        f"{F}/unknown_family/unknown-family.yaml: family: unknown family 'contrasting'; expected one of "
        "contrastive, distillation, cca_decorrelation, clustering, masked_modeling, pretext_task"
    ],
    "bad_subfamily": [
        f"{F}/bad_subfamily/bad-subfamily.yaml: subfamily: 'momentum_teacher' is not a sub-family of "
        "contrastive; expected one of memory_bank, in_batch_negatives, momentum_queue, "
        "nearest_neighbour_positives, supervised, cross_modal, predictive_coding"
    ],
    "dangling_builds_on": [
        f"{F}/dangling_builds_on/dangling-builds-on.yaml: builds_on[0]: no catalog entry 'simclr-v9'"
    ],
    "duplicate_id": [
        f"{F}/duplicate_id/dup-b.yaml: id: 'dup-a' differs from the file name 'dup-b'",
        f"{F}/duplicate_id/dup-b.yaml: id: duplicate id 'dup-a', also in {F}/duplicate_id/dup-a.yaml",
    ],
    "id_mismatch": [f"{F}/id_mismatch/id-mismatch.yaml: id: 'another-id' differs from the file name 'id-mismatch'"],
    "bad_arxiv": [
        f"{F}/bad_arxiv/bad-arxiv.yaml: arxiv: arXiv id 'arXiv:2002.05709v2' is not of the form "
        "YYMM.NNNNN (no 'arXiv:' prefix, no version)"
    ],
    "unknown_property": [
        f"{F}/unknown_property/unknown-property.yaml: properties.predicter: unknown property "
        "(did you mean 'predictor'?); see taxonomy/properties.yaml"
    ],
    "bad_enum_property": [
        f"{F}/bad_enum_property/bad-enum-property.yaml: properties.memory: expected one of "
        "none, memory_bank, queue, got 'fifo'"
    ],
    "missing_implementation": [
        f"{F}/missing_implementation/missing-implementation.yaml: implementation: file "
        "implementations/contrastive/does_not_exist.py does not exist"
    ],
    "python_object_tag": [
        f"{F}/python_object_tag/python-object-tag.yaml:11: invalid YAML: YAML tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' is not allowed: entries are plain data, "
        "and object-constructing tags are refused, never executed"
    ],
    "duplicate_key": [
        f"{F}/duplicate_key/duplicate-key.yaml:5: invalid YAML: duplicate key 'year' (first on line 4)"
    ],
    "year_out_of_range": [f"{F}/year_out_of_range/year-out-of-range.yaml: year: 1066 is outside 1950-"],
    "unknown_field": [
        f"{F}/unknown_field/unknown-field.yaml: conference: unknown field "
        "(see the entry schema in schema/catalog-entry.schema.json)"
    ],
    "method_without_loss": [
        f"{F}/method_without_loss/method-without-loss.yaml: loss_latex: a method entry gives its objective as LaTeX"
    ],
    "not_a_mapping": [f"{F}/not_a_mapping/not-a-mapping.yaml: expected a mapping of fields, got list"],
    "unknown_modality": [
        f"{F}/unknown_modality/unknown-modality.yaml: modalities[1]: unknown modality 'smell'; expected one of "
        "image, video, audio, text, tabular, time_series, graph, point_cloud, spectra, multimodal"
    ],
}


def test_every_fixture_has_an_expectation():
    assert sorted(p.name for p in BROKEN.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_broken_fixture_gives_located_message(case):
    got = _problems(case)
    want = EXPECTED[case]
    assert len(got) == len(want), got
    for g, w in zip(got, want):
        assert g.startswith(w), f"\n got: {g}\nwant: {w}"


def test_python_tag_is_never_executed(tmp_path):
    target = Path("/tmp/selfsup-pwned")
    target.unlink(missing_ok=True)
    _problems("python_object_tag")
    assert not target.exists()


def test_all_problems_reported_at_once(tmp_path):
    for case in ("missing_field", "unknown_family", "bad_arxiv", "duplicate_key"):
        for f in (BROKEN / case).iterdir():
            shutil.copy(f, tmp_path / f.name)
    problems = cat.load_catalog(ROOT, tmp_path).problems
    assert {Path(p.file).name for p in problems} == {
        "missing-field.yaml", "unknown-family.yaml", "bad-arxiv.yaml", "duplicate-key.yaml"
    }


@pytest.mark.parametrize(
    "arxiv,ok",
    [("2002.05709", True), ("1807.03748", True), ("0704.0001", True), ("hep-th/9901001", True),
     ("2013.12345", False), ("1807.0374", False), ("1407.12345", False), ("2002.05709v3", False)],
)
def test_arxiv_format(arxiv, ok):
    if ok:
        assert cat.Entry._arxiv_format(arxiv) == arxiv
    else:
        with pytest.raises(ValueError):
            cat.Entry._arxiv_format(arxiv)


def test_get_suggests_closest_id():
    catalog = cat.load_catalog(ROOT)
    with pytest.raises(KeyError, match="did you mean simclr"):
        catalog.get("simclrr")


def test_bibtex_fields():
    e = cat.load_catalog(ROOT).get("simclr")
    bib = cat.bibtex(e)
    assert bib.startswith("@inproceedings{chen2020simple,")
    assert "author = {Ting Chen and Simon Kornblith and Mohammad Norouzi and Geoffrey Hinton}" in bib
    assert "booktitle = {ICML 2020}" in bib and "eprint = {2002.05709}" in bib


# ------------------------------------------------------------------------------------------------
# Hostile and odd input: refused with file, line and field, quickly, without a traceback.


def write_entry(cdir: Path, entry_id: str, **fields) -> Path:
    """A valid entry (SimCLR's, without lineage or implementation) with ``fields`` changed."""
    data = yaml.safe_load((ROOT / "catalog" / "simclr.yaml").read_text(encoding="utf-8"))
    data.update({"id": entry_id, "builds_on": [], "implementation": None, **fields})
    cdir.mkdir(parents=True, exist_ok=True)
    path = cdir / f"{entry_id}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def problems_in(cdir: Path) -> list[str]:
    return [str(p) for p in cat.load_catalog(ROOT, cdir).problems]


def test_valid_entry_helper(tmp_path):
    write_entry(tmp_path, "ok")
    assert problems_in(tmp_path) == []


BILLION_LAUGHS = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


def test_yaml_aliases_are_refused_before_expansion(tmp_path):
    path = write_entry(tmp_path, "laughs")
    text = path.read_text().replace("notes:", "notes: [*a9]\nunused:", 1)
    path.write_text('a0: &a0 "lol"\n' + BILLION_LAUGHS + text)
    start = time.perf_counter()
    got = problems_in(tmp_path)
    assert time.perf_counter() - start < 5
    assert got == [
        f"{path}:1: invalid YAML: anchors and aliases (&name, *name) are not allowed; write the value out"
    ]


def test_yaml_anchor_refused_in_taxonomy(tmp_path):
    shutil.copytree(ROOT / "taxonomy", tmp_path / "taxonomy")
    kinds = tmp_path / "taxonomy" / "kinds.yaml"
    kinds.write_text(kinds.read_text().replace("kinds:", "kinds: &k", 1))
    with pytest.raises(cat.CatalogError, match=r"kinds\.yaml:\d+: invalid YAML: anchors and aliases"):
        cat.load_taxonomy(tmp_path)


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("id: deep\nnotes: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert problems_in(tmp_path) == [f"{path}:2: invalid YAML: nested deeper than 50 levels"]


def test_huge_values_are_not_repeated_in_messages(tmp_path):
    write_entry(tmp_path, "huge", year="1" + "x" * 500_000)
    (problem,) = problems_in(tmp_path)
    assert "year: Input should be a valid integer" in problem
    assert len(problem) < 300


def test_oversized_file_is_not_read(tmp_path):
    path = write_entry(tmp_path, "big")
    path.write_text(path.read_text() + "#" * cat.MAX_YAML_BYTES)
    (problem,) = problems_in(tmp_path)
    assert problem.startswith(f"{path}: ") and f"at most {cat.MAX_YAML_BYTES}" in problem


def test_builds_on_cycle_is_named(tmp_path):
    write_entry(tmp_path, "a", builds_on=["c"])
    write_entry(tmp_path, "b", builds_on=["a"])
    write_entry(tmp_path, "c", builds_on=["b"])
    write_entry(tmp_path, "d", builds_on=["a"])  # builds on the cycle, is not part of it
    assert problems_in(tmp_path) == [f"{tmp_path}/a.yaml: builds_on[0]: cycle a -> c -> b -> a: lineage must go one way"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_result_values_are_finite_and_non_negative(tmp_path, value):
    result = {"benchmark": "imagenet-linear", "metric": "top1", "value": value, "source": "Table 1"}
    write_entry(tmp_path, "r", results=[result])
    (problem,) = problems_in(tmp_path)
    assert problem.startswith(f"{tmp_path}/r.yaml: results[0].value: ")
    assert "finite number" in problem or "greater than or equal to 0" in problem


@pytest.mark.parametrize(
    "latex, message",
    [
        (r"\frac{a}{b", "unbalanced LaTeX: '{' at character 8 is never closed"),
        (r"a + b}", "unbalanced LaTeX: '}' at character 5 has no matching '{'"),
        (r"\left( \frac{a}{b}", r"unbalanced LaTeX: '\left' at character 0 is never closed"),
        (r"\left( {a \right) }", r"unbalanced LaTeX: '\right' at character 10 has no matching '\left'"),
        (r"$\mathcal{L}$", "'$' at character 0: the field is math already, without $ delimiters"),
    ],
)
def test_bad_latex_is_refused(tmp_path, latex, message):
    write_entry(tmp_path, "tex", loss_latex=latex)
    assert problems_in(tmp_path) == [f"{tmp_path}/tex.yaml: loss_latex: {message}"]


@pytest.mark.parametrize("latex", [r"\left\{ x \right\} \leftarrow y", r"a \\ {b}", r"\{ \}"])
def test_balanced_latex_is_accepted(latex):
    cat.check_latex(latex)


@pytest.mark.parametrize("name", ["simclr.YAML", "simclr.yml", "simclr.Yaml"])
def test_misnamed_entry_file_is_reported(tmp_path, name):
    write_entry(tmp_path, "simclr").rename(tmp_path / name)
    assert problems_in(tmp_path) == [
        f"{tmp_path}/{name}: catalog files are named <id>.yaml; rename it simclr.yaml"
    ]


def test_directory_and_broken_link_are_reported(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    assert problems_in(tmp_path) == [
        f"{tmp_path}/dangling.yaml: broken symbolic link to {tmp_path}/nowhere.yaml",
        f"{tmp_path}/folder.yaml: not a regular file",
    ]


@pytest.mark.parametrize(
    "fld, value",
    [
        ("code", "javascript:alert(1)"),
        ("url", "data:text/html,<script>alert(1)</script>"),
        ("code", "https://example.com/)<script>alert(1)</script>"),
        ("code", 'https://example.com/"onmouseover="alert(1)'),
        ("doi", "10.1234/x<script>alert(1)</script>"),
    ],
)
def test_links_are_http_urls(tmp_path, fld, value):
    write_entry(tmp_path, "link", **{fld: value})
    (problem,) = problems_in(tmp_path)
    assert problem.startswith(f"{tmp_path}/link.yaml: {fld}: ") and "does not match" in problem


@pytest.mark.parametrize("bad_id", ['x" onmouseover="alert(1)', "Contrastive", "a b"])
def test_taxonomy_ids_must_be_slugs(tmp_path, bad_id):
    shutil.copytree(ROOT / "taxonomy", tmp_path / "taxonomy")
    families = tmp_path / "taxonomy" / "families.yaml"
    text = families.read_text()
    families.write_text(text.replace("id: memory_bank", f"id: {json.dumps(bad_id)}", 1))
    with pytest.raises(cat.CatalogError, match=r"families\[0\]\.subfamilies\[0\]\.id: .* is not a lowercase slug"):
        cat.load_taxonomy(tmp_path)


def test_an_entry_that_shares_a_file_names_its_preset(tmp_path):
    simclr = "implementations/contrastive/simclr.py"
    write_entry(tmp_path, "a", implementation=simclr)
    write_entry(tmp_path, "b", implementation=simclr, preset="small")
    assert problems_in(tmp_path) == []
    write_entry(tmp_path, "c", implementation=simclr)
    owners = f"entries a, c all link {simclr} without a preset: one entry owns a file, the others name its preset"
    assert problems_in(tmp_path) == [f"{tmp_path}/{i}.yaml: implementation: {owners}" for i in "abc"]


def test_a_preset_needs_an_implementation(tmp_path):
    write_entry(tmp_path, "a", preset="small")
    assert problems_in(tmp_path) == [
        f"{tmp_path}/a.yaml: preset: a preset names a setting of an implementation file; set implementation too"]
