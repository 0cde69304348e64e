"""Bad specs fail early with the field name and the allowed values."""

import pytest
import torch
from torch import nn

from conftest import fresh_base
from perl.methods import METHODS, AdaptedPolicy, MethodSpec, MethodSpecError, adapt


def _err(spec, arch="tiny-qwen2", **kw):
    with pytest.raises(MethodSpecError) as info:
        adapt(fresh_base(arch), spec, **kw)
    return str(info.value)


def test_unknown_method_lists_valid_ones():
    msg = _err({"name": "lorra"})
    assert "peft.name" in msg and "lorra" in msg
    assert all(m in msg for m in METHODS)


@pytest.mark.parametrize("rank", [0, -3, 1.5, True])
def test_bad_rank(rank):
    assert "peft.rank" in _err({"name": "lora", "rank": rank})


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_bad_alpha(alpha):
    assert "peft.alpha" in _err({"name": "lora", "alpha": alpha})


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_bad_dropout(dropout):
    assert "peft.dropout" in _err({"name": "lora", "dropout": dropout})


def test_targets_matching_nothing_list_the_available_ones():
    msg = _err({"name": "dora", "target_modules": ["q_proj", "qkv_proj"]})
    assert "'qkv_proj'" in msg and "matches no module" in msg and "down_proj" in msg


def test_targets_of_the_wrong_kind():
    assert "adapts linear modules" in _err({"name": "lora", "target_modules": ["input_layernorm"]})
    assert "adapts norm modules" in _err({"name": "ln_tuning", "target_modules": ["q_proj"]})


def test_option_of_another_method_names_its_owner():
    msg = _err({"name": "dora", "lr_ratio": 8})
    assert "'lr_ratio' belongs to lora_plus, not to dora" in msg
    msg = _err({"name": "lora", "options": {"init_r": 12}})
    assert "belongs to adalora" in msg


def test_unknown_option_lists_accepted_ones():
    msg = _err({"name": "vera", "d_init": 0.2})
    assert "'d_init' is unknown for vera" in msg and "d_initial" in msg


def test_full_rejects_targets():
    assert "full trains every parameter" in _err({"name": "full", "target_modules": ["q_proj"]})


def test_adalora_needs_run_length():
    assert "total_steps" in _err({"name": "adalora"})
    assert "tinit" in _err({"name": "adalora", "tinit": 8, "tfinal": 5}, total_steps=10)
    assert "target_r <= init_r" in _err({"name": "adalora", "init_r": 4, "target_r": 8}, total_steps=10)


def test_ia3_feedforward_must_be_targeted():
    msg = _err({"name": "ia3", "target_modules": ["k_proj", "v_proj"]})
    assert "feedforward_modules" in msg


@pytest.mark.parametrize("name", ["milora", "pissa"])
def test_svd_init_rank_larger_than_matrix(name):
    assert "exceeds" in _err({"name": name, "rank": 64})
    # also on a shapes-only (meta) base, what the config check adapts before Ray
    from perl.models import build_model

    with pytest.raises(MethodSpecError, match="exceeds"):
        adapt(build_model("tiny-qwen2", device="meta", seed=None), {"name": name, "rank": 64})


def test_spec_from_flat_and_nested_dicts_agree():
    a = MethodSpec.from_dict({"method": "lora-plus", "rank": 8, "lr_ratio": 4, "target_modules": "q,v"})
    b = MethodSpec.from_dict({"name": "lora_plus", "rank": 8, "options": {"lr_ratio": 4}, "target_modules": ["q", "v"]})
    assert a == b and a.target_modules == ("q_proj", "v_proj") and a.name == "lora_plus"
    with pytest.raises(MethodSpecError, match="given twice"):
        MethodSpec.from_dict({"name": "lora_plus", "lr_ratio": 4, "options": {"lr_ratio": 2}})
    with pytest.raises(MethodSpecError, match="peft.name is required"):
        MethodSpec.from_dict({"rank": 8})


def test_adapting_twice_is_refused():
    policy = adapt(fresh_base("tiny-qwen2"), {"name": "lora", "rank": 4})
    with pytest.raises(MethodSpecError, match="already a PeftModel"):
        adapt(policy.model, {"name": "dora"})


def test_ambiguous_flat_parameter_is_refused_for_lora_fa():
    policy = adapt(fresh_base("tiny-qwen2"), {"name": "lora_fa", "rank": 4})

    class FlatWrapper(nn.Module):  # what FSDP1 without use_orig_params exposes for a mixed unit
        def __init__(self):
            super().__init__()
            self._flat_param = nn.Parameter(torch.zeros(10))

    flat = AdaptedPolicy(FlatWrapper(), policy.spec, policy.method, policy.options, policy.target_modules, 1)
    with pytest.raises(RuntimeError, match="flat parameter"):
        flat.param_groups(1e-3)


def test_method_option_values_are_checked_before_building():
    assert "lr_ratio must be a number > 0" in _err({"name": "lora_plus", "lr_ratio": 0})
    assert "variant must be one of" in _err({"name": "miss", "variant": "fancy"})


@pytest.mark.parametrize("options,text", [
    ({"u": 0}, "u must be an integer >= 1"),
    ({"r": 2.5}, "r must be an integer >= 1"),
    ({"weight_tying": 1.5}, "weight_tying must be a number in [0, 1]"),
    ({"weight_tying": True}, "weight_tying must be a number in [0, 1]"),
    ({"save_projection": "yes"}, "save_projection must be true or false"),
    ({"projection_seed": 0.5}, "projection_seed must be an integer"),
])
def test_tinylora_option_values_are_checked_before_building(options, text):
    assert text in _err({"name": "tinylora", **options})


def test_tinylora_options_are_its_own():
    assert "'weight_tying' belongs to tinylora, not to lora" in _err({"name": "lora", "weight_tying": 1.0})
    assert "'d_initial' belongs to vera, not to tinylora" in _err({"name": "tinylora", "d_initial": 0.1})
