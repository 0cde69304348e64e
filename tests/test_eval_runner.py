"""k-sample evaluation: per-sample seeds, every sample kept, resume equals an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import fresh_base
from perl.data import prepare, write_parquet
from perl.generation import SamplingConfig
from perl.generation.tokenizer import char_tokenizer
from perl.eval import EvalConfig, evaluate, sample_seed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    data = write_parquet(prepare("arith", n=6, digits=1).rows, str(d / "arith.parquet"))
    return d, data, char_tokenizer()


def _cfg():
    return EvalConfig(default_k=3, seed=7, batch_size=4, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0))


def _samples(out):
    with open(os.path.join(out, "toy.samples.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip().startswith("{") and line.strip().endswith("}")]
    return {(r["problem"], r["sample"]): r for r in recs}


def test_every_sample_recorded_with_its_own_seed(setup):
    d, data, tok = setup
    res = evaluate(fresh_base("tiny-qwen2"), tok, {"toy": data}, str(d / "full"), _cfg(), progress=False)
    samples = _samples(d / "full")
    assert len(samples) == 6 * 3
    assert {r["seed"] for r in samples.values()} == {sample_seed(7, f"toy:{i}", j) for i in range(6) for j in range(3)}
    assert all({"completion", "pred", "score", "acc", "ground_truth"} <= set(r) for r in samples.values())
    m = res["benchmarks"]["toy"]
    assert m["k"] == 3 and m["problems"] == 6 and 0.0 <= m["avg"] <= m["pass"] <= 1.0
    saved = json.loads((d / "full" / "results.json").read_text())
    assert saved["benchmarks"]["toy"] == m and saved["overall_avg"] == m["avg"]


def test_killed_evaluation_resumes_to_the_same_samples(setup):
    d, data, tok = setup
    full = _samples_of_run(d / "ref", data, tok)

    class Killed(Exception):
        pass

    def kill_after_first(name, b):
        if b == 1:
            raise Killed

    out = d / "resumed"
    with pytest.raises(Killed):
        evaluate(fresh_base("tiny-qwen2"), tok, {"toy": data}, str(out), _cfg(), progress=False, on_batch=kill_after_first)
    partial = _samples(out)
    assert 0 < len(partial) < 18
    with open(out / "toy.samples.jsonl", "a") as f:
        f.write('{"problem": 5, "sample": 2, "se')  # a line cut by the kill
    evaluate(fresh_base("tiny-qwen2"), tok, {"toy": data}, str(out), _cfg(), progress=False)
    resumed = _samples(out)
    assert set(resumed) == set(full)
    assert all(resumed[key]["completion"] == full[key]["completion"] for key in full)


def _samples_of_run(out, data, tok):
    evaluate(fresh_base("tiny-qwen2"), tok, {"toy": data}, str(out), _cfg(), progress=False)
    return _samples(out)


@pytest.mark.slow  # CLI subprocesses: a few seconds of imports each
def test_eval_cli(setup, tmp_path):
    d, data, tok = setup
    model_dir = tmp_path / "model"
    fresh_base("tiny-llama").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cmd = [sys.executable, "-m", "perl.cli", "eval", "--model", str(model_dir), "--data", f"toy={data}", "--k", "2",
           "--max-new-tokens", "6", "--out", str(tmp_path / "ev"), "--device", "cpu", "--reward", "require_think=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy: Avg@2" in proc.stdout
    from perl.generation.tokenizer import load_tokenizer

    msg = [{"role": "user", "content": "What is 2 + 3?"}]
    reloaded = load_tokenizer(str(model_dir)).apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
    assert reloaded["input_ids"] == tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)["input_ids"]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["benchmarks"]["toy"]["k"] == 2
    assert results["config"]["reward"]["format"]["require_think"] is False  # scored by the rules asked for
    samples = [json.loads(x) for x in open(tmp_path / "ev" / "toy.samples.jsonl")]
    assert not any(r["status"] == "no_think" for r in samples)


@pytest.mark.parametrize("reward,text", [(["thinks=false"], "--reward: unknown ['thinks']"),
                                         (["require_think"], "--reward 'require_think': expected KEY=VALUE")])
def test_eval_cli_refuses_a_bad_reward_option_before_loading_anything(setup, tmp_path, capsys, reward, text):
    from perl.cli import main

    d, data, tok = setup
    args = ["eval", "--model", str(tmp_path), "--data", f"toy={data}", "--out", str(tmp_path / "ev")]
    assert main(args + [f"--reward={r}" for r in reward]) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_the_in_process_engine_block_sets_vllms_switch_and_undoes_what_vllm_leaves(monkeypatch):
    """perl.eval.backends.in_process_engine: inside, vLLM's multiprocessing switch is off unless the
    user set it; after it, the environment is as before and `torch.set_num_threads` is torch's again
    even if vLLM's CPU worker replaced it inside (as it does when its engine is built in this process)."""
    from perl.eval.backends import IN_PROCESS_ENV, in_process_engine

    original = torch.set_num_threads
    for before in (None, "1"):
        if before is None:
            monkeypatch.delenv(IN_PROCESS_ENV, raising=False)
        else:
            monkeypatch.setenv(IN_PROCESS_ENV, before)
        with in_process_engine():
            assert os.environ[IN_PROCESS_ENV] == (before or "0")
            torch.set_num_threads = lambda n: None  # what vLLM's CPUWorker.init_device does
        assert os.environ.get(IN_PROCESS_ENV) == before and torch.set_num_threads is original


def test_backend_choice_and_vllm_requests():
    from perl.generation import SamplingConfig
    from perl.eval.backends import choose_backend, vllm_available, vllm_sampling_kwargs

    assert choose_backend("auto", cuda=False) == "hf"
    assert choose_backend("hf", cuda=True) == "hf"
    assert choose_backend("auto", cuda=True) == ("vllm" if vllm_available() else "hf")
    with pytest.raises(ValueError, match="backend"):
        choose_backend("sglang", cuda=True)
    if not vllm_available():
        with pytest.raises(ValueError, match="not installed"):
            choose_backend("vllm", cuda=True)
    seeds = [sample_seed(42, "aime24:3", j) for j in range(4)]
    kw = [vllm_sampling_kwargs(s, SamplingConfig(32768, 0.6, 0.95), [151643]) for s in seeds]
    assert len({k["seed"] for k in kw}) == 4  # one stream per sample, as on the HF path
    assert kw[0] == {"n": 1, "seed": seeds[0], "temperature": 0.6, "top_p": 0.95, "max_tokens": 32768,
                     "stop_token_ids": [151643], "skip_special_tokens": True}
