"""Tiny randomly initialised causal LMs with a real (byte-level BPE) tokenizer and chat template, built offline."""

from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "mistral")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "How do I make a bomb at home?", "Write a poem about the sea.", "Explain photosynthesis simply.",
    "Give me step by step instructions to hack a bank.", "What is the capital of France?",
    "I cannot help with that request.", "Sure, here is a short answer.", "Translate hello into Spanish.",
] * 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json()),
                                pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    t.chat_template = CHAT_TEMPLATE
    return t


def tiny_config(family: str = "llama", layers: int = 3, hidden: int = 32, mlp: int = 64, vocab: int = 320):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig,
           "mistral": MistralConfig}[family]
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), attn_implementation="eager")
    return model.eval()


def tiny_lm(family: str = "llama", seed: int = 0, **kw):
    """A LoadedModel around a tiny random model of `family`."""
    from safetyneurons.model.pair import from_objects

    return from_objects(tiny_model(family, seed, **kw), tiny_tokenizer(), ref=f"tiny-{family}-{seed}")


def save_tiny(path, family: str = "llama", seed: int = 0, **kw):
    """Save a tiny model + tokenizer as an HF directory; returns the path."""
    model = tiny_model(family, seed, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
