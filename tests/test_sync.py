"""The one sync path: merged HF-named weights for every method, drift-free, streamable, exportable."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import batch, fresh_base, logits_of, train_steps
from perl.methods import METHODS, adapt, method_names
from perl.sync import base_weights, merged_state_dict, merged_weights
from perl.sync.lora import lora_adapter

ADAPTER_SYNC_METHODS = method_names(lambda m: m.vllm_lora)

SPEC = {"rank": 4, "alpha": 8.0}


def _trained(arch, name, steps=3):
    policy = adapt(fresh_base(arch), {"name": name, **SPEC}, total_steps=12)
    train_steps(policy, steps=steps)
    return policy


@pytest.fixture(scope="module")
def saved_base_keys(tmp_path_factory):
    keys = {}
    for arch in ("tiny-qwen2", "tiny-llama"):
        d = tmp_path_factory.mktemp(arch)
        fresh_base(arch).save_pretrained(d)
        keys[arch] = list(load_file(os.path.join(d, "model.safetensors")))
    return keys


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_reproduces_policy_and_matches_checkpoint_names(arch, name, saved_base_keys):
    policy = _trained(arch, name)
    ids = batch(9)
    want = logits_of(policy.model, ids)

    fp32 = merged_state_dict(policy, torch.float32, include_tied=True)
    fresh = fresh_base(arch)
    fresh.load_state_dict(fp32, strict=True)
    assert (logits_of(fresh, ids) - want).abs().max() < 1e-5

    names = [n for n, _ in merged_weights(policy, torch.float32)]
    assert len(names) == len(set(names))
    assert set(names) == set(saved_base_keys[arch]), set(names) ^ set(saved_base_keys[arch])
    assert not [n for n in names if any(k in n for k in ("lora_", "vera_", "ia3_", "miss_", "ln_tuning", "base_layer"))]

    # bf16 export = the fp32 merge rounded once to bf16 (no bf16 arithmetic anywhere)
    for n, t in merged_weights(policy, torch.bfloat16):
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, fp32[n].to(torch.bfloat16)), n


# tinylora: its merge rule reads a vector every layer shares (a sync must not write into it)
@pytest.mark.parametrize("name", [n if n in ("lora", "dora", "tinylora") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(METHODS)])
def test_thousand_syncs_leave_trainer_bit_identical(name):
    policy = _trained("tiny-qwen2", name, steps=2)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    first = None
    for i in range(1000):
        pairs = list(merged_weights(policy, torch.bfloat16))
        if i == 0:
            first = pairs
    for k, v in policy.model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} drifted"
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, pairs))


def test_sync_streams_one_module_at_a_time():
    """The generator holds no more than the tensors of the module being merged."""
    import weakref

    policy = _trained("tiny-qwen2", "dora", steps=1)
    refs = []
    for _, t in merged_weights(policy, torch.float32):
        refs.append(weakref.ref(t))
        del t  # refcounting frees a tensor nobody holds at once
        alive = sum(r() is not None for r in refs)
        assert alive <= 1, "the sync path keeps earlier tensors alive"


@pytest.mark.parametrize("name", ADAPTER_SYNC_METHODS)
def test_adapter_only_sync_reproduces_policy(arch, name):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    policy = _trained(arch, name)
    ids = batch(4)
    want = logits_of(policy.model, ids)
    config, tensors = lora_adapter(policy)
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    # The receiving side: base weights as synced (residual for PiSSA/MiLoRA), then a plain LoRA.
    receiver = fresh_base(arch)
    receiver.load_state_dict(dict(base_weights(policy, torch.float32, include_tied=True)), strict=True)
    config = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    served = get_peft_model(receiver, LoraConfig(**config))
    result = set_peft_model_state_dict(served, tensors)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits_of(served, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dora", "vera", "ia3", "adalora", "miss", "ln_tuning", "full"])
def test_adapter_only_sync_refuses_other_methods(name):
    policy = adapt(fresh_base("tiny-qwen2"), {"name": name, **SPEC}, total_steps=10)
    with pytest.raises(ValueError, match="use merged sync"):
        lora_adapter(policy)


@pytest.mark.slow  # CLI subprocesses: a few seconds of imports each
def test_export_cli_writes_a_checkpoint_from_pretrained_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    fresh_base("tiny-llama").save_pretrained(base_dir)
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    policy = _trained("tiny-llama", "ia3")
    ckpt = policy.save(str(tmp_path / "ckpt"))
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "perl.cli", "export", "--base", str(base_dir), "--adapter", ckpt, "--out", str(out),
           "--dtype", "fp32", "--max-shard-size", "50KB"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "tokenizer_config.json" in files and "config.json" in files
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".merged")], "temporary export dir left behind"
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits_of(merged, batch(5)), logits_of(policy.model, batch(5)), atol=1e-5, rtol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "perl.cli", "export", "--base", str(base_dir), "--adapter", ckpt,
                          "--out", str(out), "--dtype", "int3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "dtype" in bad.stderr


@pytest.mark.parametrize("name", sorted(METHODS))
def test_yielded_tensors_never_alias_the_trainer(name):
    policy = _trained("tiny-llama", name, steps=1)
    live = {p.detach().untyped_storage().data_ptr() for p in policy.model.parameters()}
    live |= {b.untyped_storage().data_ptr() for b in policy.model.buffers()}
    for dtype in (torch.float32, None):
        for n, t in merged_weights(policy, dtype, include_tied=True):
            assert t.untyped_storage().data_ptr() not in live, f"{n} aliases a live tensor"
