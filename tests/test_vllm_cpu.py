"""vLLM's CPU build as PeRL uses it: `perl eval`'s vLLM backend, and weight updates (PeRL's vLLM plugin).

- perl eval with `--backend vllm` on CPU: every sample seeded, k samples per problem, a rerun
  resumes from the sample file and reproduces it;
- the plugin (perl/verl_glue/vllm_cpu_plugin.py) keeps every linear weight in place: new weights
  loaded the way verl's weight sync loads them (`model.load_weights(pairs)`) change what vLLM
  generates, and greedy output then equals HF generate on those weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A small Llama with the character tokenizer (vLLM serves head size 32), random weights."""
    from perl.generation.tokenizer import char_tokenizer
    from perl.toy.task import ToyConfig

    tok = char_tokenizer()
    config = ToyConfig(layers=2).model_config(len(tok), tok.pad_token_id, tok.eos_token_id)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = str(tmp_path_factory.mktemp("vllm") / "model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_perl_eval_vllm_backend_seeds_every_sample_and_resumes(tmp_path, toy_model):
    from perl.data import write_parquet
    from perl.toy.task import ToyConfig, toy_rows

    data = write_parquet(toy_rows(6, ToyConfig(), "test", seed=3), str(tmp_path / "toy.parquet"))
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "perl.cli", "eval", "--model", toy_model, "--data", f"toy={data}", "--out", str(out),
           "--k", "3", "--backend", "vllm", "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "1.0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    # the engine ran in perl eval's own process (perl.eval.backends.in_process_engine): vLLM prefixes
    # the log lines of a spawned engine process with its name
    assert "Loading safetensors checkpoint shards" in first.stderr
    assert "(EngineCore pid=" not in first.stderr and "(Worker pid=" not in first.stderr
    samples = [json.loads(x) for x in open(out / "toy.samples.jsonl")]
    assert len(samples) == 18 and len({s["seed"] for s in samples}) == 18  # one seed per sample
    results = json.load(open(out / "results.json"))
    assert results["run"]["backend"] == "vllm" and results["benchmarks"]["toy"]["k"] == 3
    # a rerun with half the samples gone regenerates exactly those (each sample is its own seed's)
    with open(out / "toy.samples.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples[:9])
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    redone = [json.loads(x) for x in open(out / "toy.samples.jsonl")]
    key = lambda s: (s["problem"], s["sample"])  # noqa: E731
    assert sorted(redone, key=key) == sorted(samples, key=key)


def _greedy_hf(model_dir: str, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_weight_updates_reach_vllm_cpu_generation(tmp_path, toy_model):
    """Load other weights into a running vLLM CPU engine as verl's sync does; it then generates
    what HF generates with those weights (the plugin keeps the weights the linears compute with)."""
    from transformers import AutoModelForCausalLM

    other = str(tmp_path / "other")
    model = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(other)
    script = f"""
import json, os, torch
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# the engine in this process: apply_model then calls the functions below directly (across processes
# vLLM pickles them by name, which a `python -c` script's functions have not)
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from safetensors.torch import load_file
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={toy_model!r}, dtype="float32", enforce_eager=True, max_model_len=64, enable_prefix_caching=False)
prompt = [5, 30, 41, 12, 7]
params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
gen = lambda: list(llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0].outputs[0].token_ids)
before = gen()
weights = load_file(os.path.join({other!r}, "model.safetensors"))
kept = llm.apply_model(lambda m: all(p.numel() > 0 for n, p in m.named_parameters() if n.endswith("proj.weight")))
llm.apply_model(lambda m: m.load_weights(list(weights.items())) and None)
after = gen()
# what the agent loop asks of verl's server (perl.verl_glue.agent_loop.token_only): tokens and their
# log-probs without detokenizing; the same seeded draw with and without it
def sampled(detokenize):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7, logprobs=0, detokenize=detokenize)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0].outputs[0]
    return {{"ids": list(out.token_ids), "lp": [d[t].logprob for t, d in zip(out.token_ids, out.logprobs)],
            "text": out.text, "decoded": [d[t].decoded_token for t, d in zip(out.token_ids, out.logprobs)]}}
token_only, detokenized = sampled(False), sampled(True)
print("RESULT", json.dumps({{"before": before, "after": after, "kept": kept, "token_only": token_only,
                            "detokenized": detokenized}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    result = json.loads(line[0][len("RESULT "):])
    prompt = [5, 30, 41, 12, 7]
    assert all(result["kept"])  # every linear still holds its weight after loading
    assert result["before"] == _greedy_hf(toy_model, prompt, 12)
    assert result["after"] == _greedy_hf(other, prompt, 12) != result["before"]
    token_only, detokenized = result["token_only"], result["detokenized"]
    assert token_only["ids"] == detokenized["ids"] and token_only["lp"] == detokenized["lp"]
    assert detokenized["text"] and all(detokenized["decoded"])  # vLLM's default decodes every token twice
    assert token_only["text"] == "" and not any(token_only["decoded"])  # skipped
