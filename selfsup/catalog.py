"""The catalog: one YAML file per paper, validated against a pydantic model and the taxonomy.

Loading never stops at the first problem: [`load_catalog`][selfsup.catalog.load_catalog] returns every entry
it could read and a list of [`Problem`][selfsup.catalog.Problem], each naming the file, the field and what was
expected, so that a whole catalog can be fixed in one pass. YAML is read with a safe loader that also refuses
duplicate keys; tags that would construct Python objects are reported, never executed. Anchors and aliases
(which can expand a small file into gigabytes) and nesting deeper than `MAX_YAML_DEPTH` are refused while the
file is parsed, before anything is built from it.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ROOT = Path(__file__).resolve().parent.parent

ID_PATTERN = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
# New-style arXiv ids (0704.0001 onwards): YYMM.NNNN until 2014, YYMM.NNNNN since 2015.
ARXIV_NEW = re.compile(r"^(\d{2})(\d{2})\.(\d{4,5})$")
ARXIV_OLD = re.compile(r"^[a-z][a-z\-]*(?:\.[A-Z]{2})?/\d{7}$")
# Crossref's pattern for modern DOIs: no spaces, quotes or angle brackets.
DOI_PATTERN = r"^10\.\d{4,9}/[-._;()/:a-zA-Z0-9]+$"
FIRST_YEAR = 1950
# Bounds on what is read from disk: an entry is a few kilobytes and a dozen levels deep at most.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 50
# An absolute http(s) URL: other schemes (javascript:, data:) never become links on the site, and the
# characters RFC 3986 does not allow in a URL (spaces, quotes, angle brackets) are refused.
HTTP_URL_PATTERN = r"^https?://[^\s<>\"{}|\\^`]+$"

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80


def _short(value: Any) -> str:
    """A repr for messages: values come from files, and an error must not repeat a huge one."""
    return _SHORT.repr(value)


# --------------------------------------------------------------------------------------------
# Model of one entry
# --------------------------------------------------------------------------------------------


def check_latex(text: str) -> None:
    """Raise ValueError unless braces and ``\\left``/``\\right`` pairs nest properly and no ``$`` occurs."""
    opened: list[tuple[str, int]] = []  # ("{" or "\\left", position), innermost last
    closing = {"}": "{", "\\right": "\\left"}
    for m in re.finditer(r"\\[a-zA-Z]+|\\.|[{}$]", text):
        token = m.group()
        if token == "$":
            raise ValueError(f"'$' at character {m.start()}: the field is math already, without $ delimiters")
        if token in ("{", "\\left"):
            opened.append((token, m.start()))
        elif token in closing:
            if not opened or opened[-1][0] != closing[token]:
                where = f"'{token}' at character {m.start()}"
                raise ValueError(f"unbalanced LaTeX: {where} has no matching '{closing[token]}'")
            opened.pop()
    if opened:
        token, pos = opened[-1]
        raise ValueError(f"unbalanced LaTeX: '{token}' at character {pos} is never closed")


class Result(BaseModel):
    """A number the paper reports, with where it reports it."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str = Field(description="A benchmark id from taxonomy/benchmarks.yaml.")
    metric: str = Field(description="top1, top5, mAP, AP50, APbox, mIoU, ...")
    value: float = Field(ge=0, allow_inf_nan=False, description="A finite, non-negative number.")
    backbone: str | None = Field(default=None, description="e.g. resnet50, vit-b16.")
    epochs: int | None = Field(default=None, ge=1, description="Pretraining epochs.")
    source: str = Field(min_length=1, description="Where in the paper: 'Table 1', 'Sec. 4.2'.")
    pretrain_data: str | None = Field(
        default=None, description="What the model was pretrained on: an id from taxonomy/pretrain_data.yaml."
    )
    pretrain_labels: bool = Field(
        default=False, description="Pretraining used the labels (supervised or semi-supervised pretraining)."
    )
    notes: str | None = None


class Entry(BaseModel):
    """One paper. See catalog/README.md and taxonomy/ for the meaning of each field."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(pattern=ID_PATTERN, description="Lowercase slug; equals the file name.")
    name: str | None = Field(
        default=None, max_length=40, description="Short display name, e.g. 'SimCLR', 'MoCo v2'."
    )
    title: str = Field(min_length=3)
    former_titles: list[str] = Field(
        default_factory=list,
        description="Titles of earlier versions (e.g. the first arXiv version) under which the paper is also cited.",
    )
    authors: list[str] = Field(
        description="Full author list in paper order; may be partial only if author_count says so."
    )
    author_count: int | None = Field(
        default=None, ge=1, description="Number of authors, when the list cannot be completed."
    )
    year: int
    venue: str | None = None
    arxiv: str | None = Field(default=None, description="arXiv id without version; null if unsure.")
    doi: str | None = Field(default=None, pattern=DOI_PATTERN)
    url: str | None = Field(default=None, pattern=HTTP_URL_PATTERN)
    kind: str
    family: str | None = None
    subfamily: str | None = None
    also: list[str] = Field(default_factory=list, description="Secondary families.")
    code: str | None = Field(default=None, pattern=HTTP_URL_PATTERN, description="Official code.")
    modalities: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    summary: str = Field(min_length=40, description="2-4 sentences in our own words.")
    key_idea: str = Field(min_length=10, description="One sentence.")
    loss_latex: str | None = Field(default=None, description="The objective in LaTeX math, without $ delimiters.")
    properties: dict[str, bool | str | None] = Field(default_factory=dict)
    builds_on: list[str] = Field(default_factory=list)
    results: list[Result] = Field(default_factory=list)
    implementation: str | None = Field(
        default=None, pattern=r"^implementations/[a-z_]+/[a-z0-9_]+\.py$"
    )
    preset: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="When this entry shares its implementation file with the entry the file is written for "
        "(MoCo v1 in the MoCo v2 file): the file's preset that gives this paper's setting.",
    )
    notes: list[str] = Field(default_factory=list)

    @field_validator("authors")
    @classmethod
    def _authors_non_blank(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name.strip() or name.strip().lower() in {"et al", "et al."}:
                raise ValueError(f"author names must be real names, got {_short(name)}")
        return v

    @field_validator("tags")
    @classmethod
    def _tags_are_slugs(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not re.match(ID_PATTERN, tag):
                raise ValueError(f"tag {_short(tag)} must be a lowercase slug like 'non-contrastive'")
        return v

    @field_validator("loss_latex")
    @classmethod
    def _latex_balanced(cls, v: str | None) -> str | None:
        if v is not None:
            check_latex(v)
        return v

    @field_validator("arxiv")
    @classmethod
    def _arxiv_format(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = ARXIV_NEW.match(v)
        if m:
            yy, mm, num = int(m.group(1)), int(m.group(2)), m.group(3)
            if not 1 <= mm <= 12:
                raise ValueError(f"arXiv id {_short(v)} has month {mm:02d}; expected 01-12")
            if (yy >= 15) != (len(num) == 5):
                raise ValueError(
                    f"arXiv id {_short(v)}: ids from 2015 on have 5 digits after the dot, earlier ones 4"
                )
            return v
        if ARXIV_OLD.match(v):
            return v
        raise ValueError(f"arXiv id {_short(v)} is not of the form YYMM.NNNNN (no 'arXiv:' prefix, no version)")

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def first_author_surname(self) -> str:
        if not self.authors:
            return "anonymous"
        return self.authors[0].split()[-1]

    @property
    def arxiv_url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else None

    @property
    def doi_url(self) -> str | None:
        return f"https://doi.org/{self.doi}" if self.doi else None

    @property
    def link(self) -> str | None:
        """The best link to the paper."""
        return self.arxiv_url or self.doi_url or self.url


# --------------------------------------------------------------------------------------------
# Taxonomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Property:
    id: str
    name: str
    type: Literal["bool", "enum"]
    description: str
    values: tuple[str, ...] = ()


@dataclass
class Taxonomy:
    families: list[dict[str, Any]]
    properties: list[Property]
    modalities: list[dict[str, Any]]
    kinds: list[dict[str, Any]]
    benchmarks: list[dict[str, Any]]
    pretrain_data: list[dict[str, Any]] = field(default_factory=list)

    @property
    def family_ids(self) -> list[str]:
        return [f["id"] for f in self.families]

    def family(self, family_id: str) -> dict[str, Any]:
        return next(f for f in self.families if f["id"] == family_id)

    def subfamily_ids(self, family_id: str) -> list[str]:
        return [s["id"] for s in self.family(family_id).get("subfamilies", [])]

    @property
    def property_map(self) -> dict[str, Property]:
        return {p.id: p for p in self.properties}

    @property
    def modality_ids(self) -> list[str]:
        return [m["id"] for m in self.modalities]

    @property
    def kind_ids(self) -> list[str]:
        return [k["id"] for k in self.kinds]

    @property
    def benchmark_ids(self) -> list[str]:
        return [b["id"] for b in self.benchmarks]


# --------------------------------------------------------------------------------------------
# Problems and YAML reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the catalog: where it is and what was expected."""

    file: str
    field: str | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class CatalogError(Exception):
    """Raised by [`load_catalog_or_raise`][selfsup.catalog.load_catalog_or_raise]; holds every problem
    found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that catalog and taxonomy files may not use."""


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML would keep the last), anchors and
    aliases, and nesting deeper than MAX_YAML_DEPTH.

    Both refusals happen in the composer, event by event: an alias chain ("billion laughs") is stopped at
    its first anchor, before anything is expanded, and depth is counted before the recursive composer
    could exhaust the stack.
    """

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _RefusedYAML(
                problem="anchors and aliases (&name, *name) are not allowed; write the value out",
                problem_mark=event.start_mark,
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise _RefusedYAML(
                problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _UniqueKeySafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {_short(key)} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeySafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _read_text(path: Path, display: str) -> tuple[str | None, Problem | None]:
    """The text of a regular file of at most MAX_YAML_BYTES, or a problem saying why not."""
    if path.is_symlink() and not path.exists():
        return None, Problem(display, None, f"broken symbolic link to {os.readlink(path)}")
    if not path.exists():
        return None, Problem(display, None, "does not exist")
    if not path.is_file():  # a directory, a FIFO (reading would block), ...
        return None, Problem(display, None, "not a regular file")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            return None, Problem(display, None, f"{size} bytes; a YAML file here is at most {MAX_YAML_BYTES} bytes")
        return path.read_text(encoding="utf-8"), None
    except UnicodeDecodeError as e:
        return None, Problem(display, None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
    except OSError as e:
        return None, Problem(display, None, f"cannot be read: {e.strerror}")


def read_yaml(path: Path, display: str | None = None) -> tuple[Any, Problem | None]:
    """Parse one YAML file safely. Returns (data, None) or (None, problem with line number)."""
    display = display or str(path)
    text, problem = _read_text(path, display)
    if problem:
        return None, problem
    try:
        return yaml.load(text, Loader=_UniqueKeySafeLoader), None
    except (yaml.constructor.ConstructorError, _RefusedYAML) as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        message = e.problem or str(e)
        if "could not determine a constructor for the tag" in message:
            tag = message.split("tag", 1)[1].strip().strip("'")
            message = (
                f"YAML tag {_short(tag)} is not allowed: entries are plain data, "
                "and object-constructing tags are refused, never executed"
            )
        return None, Problem(display, None, f"invalid YAML: {message}", line)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        return None, Problem(display, None, f"malformed YAML: {e.problem}", line)
    except yaml.YAMLError as e:
        return None, Problem(display, None, f"malformed YAML: {e}")


TAXONOMY_ID_PATTERN = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")


def _check_taxonomy_ids(items: list, display: str, where: str) -> None:
    """Taxonomy ids (and enum values) end up in URLs, HTML ids and attributes: plain slugs only."""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CatalogError([Problem(display, f"{where}[{i}]", "expected a mapping with an id")])
        values = [("id", item.get("id"))] + [(f"values[{k}]", v) for k, v in enumerate(item.get("values", ()))]
        for fld, value in values:
            if not isinstance(value, str) or not TAXONOMY_ID_PATTERN.match(value):
                raise CatalogError([Problem(display, f"{where}[{i}].{fld}",
                                            f"{_short(value)} is not a lowercase slug like 'memory_bank'")])
        if "subfamilies" in item:
            _check_taxonomy_ids(item["subfamilies"] or [], display, f"{where}[{i}].subfamilies")


def load_taxonomy(root: Path = ROOT) -> Taxonomy:
    """Load taxonomy/*.yaml; a broken taxonomy is a bug of the repository, so it raises."""
    tax = root / "taxonomy"

    def section(name: str) -> list[dict[str, Any]]:
        data, problem = read_yaml(tax / f"{name}.yaml")
        if problem:
            raise CatalogError([problem])
        if not isinstance(data, dict) or not isinstance(data.get(name), list):
            raise CatalogError([Problem(str(tax / f"{name}.yaml"), name, "expected a list")])
        _check_taxonomy_ids(data[name], str(tax / f"{name}.yaml"), name)
        return data[name]

    props = [
        Property(
            id=p["id"],
            name=p["name"],
            type=p["type"],
            description=p["description"],
            values=tuple(p.get("values", ())),
        )
        for p in section("properties")
    ]
    return Taxonomy(
        families=section("families"),
        properties=props,
        modalities=section("modalities"),
        kinds=section("kinds"),
        benchmarks=section("benchmarks"),
        pretrain_data=section("pretrain_data"),
    )


# --------------------------------------------------------------------------------------------
# Catalog loading and cross-entry checks
# --------------------------------------------------------------------------------------------


@dataclass
class Catalog:
    entries: dict[str, Entry]
    taxonomy: Taxonomy
    root: Path
    problems: list[Problem] = field(default_factory=list)

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, entry_id: str) -> Entry:
        """The entry with this id; KeyError names the closest ids when there is none."""
        try:
            return self.entries[entry_id]
        except KeyError:
            close = difflib.get_close_matches(entry_id, list(self.entries), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"no catalog entry {entry_id!r}{hint}") from None

    def built_upon_by(self, entry_id: str) -> list[Entry]:
        return sorted(
            (e for e in self if entry_id in e.builds_on), key=lambda e: (e.year, e.id)
        )

    def sorted(self) -> list[Entry]:
        return sorted(self.entries.values(), key=lambda e: (e.year, e.id))


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_problems(display: str, err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        where = _loc_str(e["loc"]) or None
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (see the entry schema in schema/catalog-entry.schema.json)"
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{_short(e['input'])} does not match the expected pattern {e['ctx']['pattern']}"
        elif "input" in e and e["type"] not in {"value_error"}:
            msg = f"{msg} (got {_short(e['input'])})"
        problems.append(Problem(display, where, msg.removeprefix("Value error, ")))
    return problems


def check_entry(entry: Entry, display: str, tax: Taxonomy, root: Path) -> list[Problem]:
    """Checks of one entry against the taxonomy and the file system."""
    out: list[Problem] = []

    def bad(fld: str, msg: str) -> None:
        out.append(Problem(display, fld, msg))

    max_year = datetime.date.today().year + 1
    if not FIRST_YEAR <= entry.year <= max_year:
        bad("year", f"{entry.year} is outside {FIRST_YEAR}-{max_year}")
    if entry.arxiv and ARXIV_NEW.match(entry.arxiv):
        arxiv_year = 2000 + int(entry.arxiv[:2])
        if arxiv_year > entry.year + 1 or arxiv_year < 2007:
            bad("arxiv", f"{_short(entry.arxiv)} was posted in {arxiv_year}, but the entry's year is {entry.year}")
    if entry.author_count is not None and len(entry.authors) > entry.author_count:
        bad("authors", f"{len(entry.authors)} names listed but author_count is {entry.author_count}")
    if not entry.authors and entry.author_count is None:
        bad("authors", "empty; list the authors, or give author_count when they cannot be verified")
    if entry.kind not in tax.kind_ids:
        bad("kind", f"unknown kind {_short(entry.kind)}; expected one of {', '.join(tax.kind_ids)}")
    if entry.family is not None:
        if entry.family not in tax.family_ids:
            bad("family", f"unknown family {_short(entry.family)}; expected one of {', '.join(tax.family_ids)}")
        elif entry.subfamily is not None and entry.subfamily not in tax.subfamily_ids(entry.family):
            subs = ", ".join(tax.subfamily_ids(entry.family))
            bad("subfamily", f"{_short(entry.subfamily)} is not a sub-family of {entry.family}; expected one of {subs}")
    elif entry.subfamily is not None:
        bad("subfamily", "set while family is null")
    for i, fam in enumerate(entry.also):
        if fam not in tax.family_ids:
            bad(f"also[{i}]", f"unknown family {_short(fam)}; expected one of {', '.join(tax.family_ids)}")
        elif fam == entry.family:
            bad(f"also[{i}]", f"{_short(fam)} repeats the primary family")
    for i, mod in enumerate(entry.modalities):
        if mod not in tax.modality_ids:
            bad(f"modalities[{i}]", f"unknown modality {_short(mod)}; expected one of {', '.join(tax.modality_ids)}")
    props = tax.property_map
    for name, value in entry.properties.items():
        if name not in props:
            close = difflib.get_close_matches(name, list(props), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            bad(f"properties.{name}", f"unknown property{hint}; see taxonomy/properties.yaml")
            continue
        prop = props[name]
        if value is None:
            continue
        if prop.type == "bool" and not isinstance(value, bool):
            bad(f"properties.{name}", f"expected true or false, got {_short(value)}")
        elif prop.type == "enum" and value not in prop.values:
            bad(f"properties.{name}", f"expected one of {', '.join(prop.values)}, got {_short(value)}")
    if entry.kind == "method":
        missing = [p for p in props if p not in entry.properties]
        if missing:
            bad("properties", f"a method entry sets every comparison property; missing {', '.join(missing)}")
        if not entry.loss_latex:
            bad("loss_latex", "a method entry gives its objective as LaTeX")
        if entry.family is None:
            bad("family", "a method entry belongs to a family")
    for i, res in enumerate(entry.results):
        data_ids = [d["id"] for d in tax.pretrain_data]
        if res.pretrain_data is not None and res.pretrain_data not in data_ids:
            bad(f"results[{i}].pretrain_data", f"unknown pretraining data {_short(res.pretrain_data)}; expected one of {', '.join(data_ids)}")
        if res.benchmark not in tax.benchmark_ids:
            bad(f"results[{i}].benchmark", f"unknown benchmark {_short(res.benchmark)}; expected one of {', '.join(tax.benchmark_ids)}")
    if entry.implementation is not None:
        path = root / entry.implementation
        if not path.is_file():
            bad("implementation", f"file {entry.implementation} does not exist")
        elif entry.family and path.parent.name != entry.family:
            bad("implementation", f"{entry.implementation} is not under implementations/{entry.family}/")
    if entry.preset is not None and entry.implementation is None:
        bad("preset", "a preset names a setting of an implementation file; set implementation too")
    if entry.id in entry.builds_on:
        bad("builds_on", "an entry cannot build on itself")
    return out


def load_catalog(root: Path = ROOT, catalog_dir: Path | None = None) -> Catalog:
    """Load and check every ``*.yaml`` under the catalog directory; collect all problems."""
    tax = load_taxonomy(root)
    cdir = catalog_dir or root / "catalog"
    entries: dict[str, Entry] = {}
    where: dict[str, str] = {}
    problems: list[Problem] = []
    if not cdir.is_dir():
        return Catalog({}, tax, root, [Problem(str(cdir), None, "catalog directory does not exist")])
    # Every YAML-looking name is considered, whatever its case, so that a misnamed entry is reported
    # rather than silently left out; other files (README.md) are not entries.
    for path in sorted(p for p in cdir.iterdir() if p.suffix.lower() in {".yaml", ".yml"}):
        display = _display(path, root)
        if path.suffix != ".yaml":
            message = f"catalog files are named <id>.yaml; rename it {path.stem}.yaml"
            problems.append(Problem(display, None, message))
            continue
        data, problem = read_yaml(path, display)
        if problem:
            problems.append(problem)
            continue
        if not isinstance(data, dict):
            problems.append(Problem(display, None, f"expected a mapping of fields, got {type(data).__name__}"))
            continue
        try:
            entry = Entry.model_validate(data)
        except ValidationError as e:
            problems.extend(_pydantic_problems(display, e))
            continue
        if entry.id != path.stem:
            problems.append(Problem(display, "id", f"{_short(entry.id)} differs from the file name {path.stem!r}"))
        if entry.id in entries:
            problems.append(Problem(display, "id", f"duplicate id {_short(entry.id)}, also in {where[entry.id]}"))
            continue
        problems.extend(check_entry(entry, display, tax, root))
        entries[entry.id] = entry
        where[entry.id] = display
    for entry in entries.values():
        for i, dep in enumerate(entry.builds_on):
            if dep not in entries:
                close = difflib.get_close_matches(dep, list(entries), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    Problem(where[entry.id], f"builds_on[{i}]", f"no catalog entry {_short(dep)}{hint}")
                )
    by_file: dict[str, list[Entry]] = {}
    for entry in entries.values():
        if entry.implementation:
            by_file.setdefault(entry.implementation, []).append(entry)
    for file, linked in by_file.items():
        owners = [e.id for e in linked if e.preset is None]
        if len(owners) != 1:
            for e in linked:
                what = f"entries {', '.join(owners)} all link" if owners else "no entry links"
                problems.append(Problem(where[e.id], "implementation", (
                    f"{what} {file} without a preset: one entry owns a file, the others name its preset")))
    for cycle in builds_on_cycles(entries):
        first, second = cycle[0], cycle[1]
        i = entries[first].builds_on.index(second)
        path = " -> ".join([*cycle, first])
        problems.append(Problem(where[first], f"builds_on[{i}]", f"cycle {path}: lineage must go one way"))
    return Catalog(entries, tax, root, problems)


def builds_on_cycles(entries: dict[str, Entry]) -> list[list[str]]:
    """Cycles of ``builds_on`` links (self-links aside), each once, starting at its smallest id.

    An iterative depth-first search: a catalog can be long enough that recursion would not do.
    """
    def parents(entry_id: str) -> list[str]:
        return [d for d in entries[entry_id].builds_on if d in entries and d != entry_id]

    done: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(entries):
        if start in done:
            continue
        path, todo = [start], [iter(parents(start))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                done.add(path.pop())
                todo.pop()
            elif nxt in path:
                cycle = path[path.index(nxt):]
                k = cycle.index(min(cycle))
                cycle = cycle[k:] + cycle[:k]
                if cycle not in cycles:
                    cycles.append(cycle)
            elif nxt not in done:
                path.append(nxt)
                todo.append(iter(parents(nxt)))
    return cycles


def load_catalog_or_raise(root: Path = ROOT) -> Catalog:
    """[`load_catalog`][selfsup.catalog.load_catalog], raising [`CatalogError`][selfsup.catalog.CatalogError]
    with every problem if there is any."""
    cat = load_catalog(root)
    if cat.problems:
        raise CatalogError(cat.problems)
    return cat


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    schema = Entry.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "selfsup catalog entry"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


_BIB_ESCAPES = {"&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_"}


def _bib_escape(text: str) -> str:
    return "".join(_BIB_ESCAPES.get(c, c) for c in text)


def bibtex_key(entry: Entry) -> str:
    surname = re.sub(r"[^a-z]", "", entry.first_author_surname.lower()) or "anon"
    word = next(
        (w for w in re.findall(r"[a-z0-9]+", entry.title.lower()) if w not in {"a", "an", "the", "on", "of"}),
        "paper",
    )
    return f"{surname}{entry.year}{word}"


def bibtex(entry: Entry) -> str:
    """A BibTeX record: @inproceedings for a conference venue, @article otherwise."""
    venue = entry.venue or ""
    is_conf = bool(re.search(r"\b(CVPR|ICCV|ECCV|NeurIPS|NIPS|ICML|ICLR|AAAI|IJCAI|Interspeech|ICASSP|KDD|WACV|BMVC|CoRL|MICCAI|ACL|EMNLP|NAACL|AISTATS|COLT|UAI|Workshop|Conference|Proceedings)\b", venue))
    fields: list[tuple[str, str]] = [("title", "{" + _bib_escape(entry.title) + "}")]
    authors = list(entry.authors)
    if entry.author_count and len(authors) < entry.author_count:
        authors.append("others")
    fields.append(("author", " and ".join(authors) or "others"))
    fields.append(("year", str(entry.year)))
    if venue and not venue.lower().startswith("arxiv"):
        fields.append(("booktitle" if is_conf else "journal", _bib_escape(venue)))
    elif entry.arxiv:
        fields.append(("journal", f"arXiv preprint arXiv:{entry.arxiv}"))
    if entry.arxiv:
        fields += [("eprint", entry.arxiv), ("archivePrefix", "arXiv")]
    if entry.doi:
        fields.append(("doi", entry.doi))
    if entry.link:
        fields.append(("url", entry.link))
    # One line per field, whatever line breaks a value holds: no line can start a Markdown fence.
    body = ",\n".join(f"  {k} = {{{' '.join(v.split())}}}" for k, v in fields)
    kind = "inproceedings" if is_conf and not venue.lower().startswith("arxiv") else "article"
    return f"@{kind}{{{bibtex_key(entry)},\n{body}\n}}"
