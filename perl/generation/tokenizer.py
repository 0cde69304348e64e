"""A character-level tokenizer built in code (no hub): printable ASCII plus the format tokens.

Used by the tiny models of the tests and the CPU toy run. Built with `tokenizers` and wrapped as a
`PreTrainedTokenizerFast` with a chat template, so it behaves like any HF tokenizer
(`apply_chat_template`, `decode`, `save_pretrained`).
"""

from __future__ import annotations

import string

SPECIAL = ["<pad>", "<eos>", "<unk>"]
FORMAT_TOKENS = ["<|user|>", "<|assistant|>", "<think>", "</think>", "\\boxed"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(SPECIAL + FORMAT_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.add_tokens(FORMAT_TOKENS)  # matched whole, before the per-character split
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str):
    """AutoTokenizer, except for tokenizers saved as a plain `tokenizers` backend (like ours):
    transformers 5 would map them to the model type's class (e.g. Qwen2Tokenizer), whose
    normalisation drops the spaces this character tokenizer encodes."""
    import json
    import os

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of a chat prompt ready for generation (transformers 5 returns a BatchEncoding)."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)["input_ids"]
