"""Each method is verifiably itself: what trains, the shapes, the scale, the frozen parts, the init."""

import math

import pytest
import torch
from torch import nn

from conftest import batch, fresh_base, logits_of, train_steps
from perl.methods import ALL_LINEAR, METHODS, adapt, count_parameters

R, ALPHA = 8, 16.0
PAPER = {"full", "lora", "dora", "miss", "adalora", "lora_plus", "rslora", "pissa", "milora", "lora_fa", "vera",
         "ln_tuning", "ia3"}
EXPECTED = PAPER | {"tinylora"}  # beyond the paper (issue 29)


def _spec(name, **kw):
    return {"name": name, "rank": R, "alpha": ALPHA, **kw}


def _trainable(policy):
    return dict(policy.trainable_parameters())


def _layers(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def _n_layers(model):
    return model.get_base_model().config.num_hidden_layers


def test_registry_has_exactly_the_paper_methods_and_tinylora():
    assert set(METHODS) == EXPECTED
    for m in METHODS.values():
        assert m.category in {"Baseline", "Structural", "Efficient", "Initialization", "Other"}


def test_full_trains_everything(arch):
    base = fresh_base(arch)
    total = count_parameters(base)
    policy = adapt(base, {"name": "full"})
    assert policy.model is base
    assert all(p.requires_grad for p in base.parameters())
    assert policy.num_trainable() == total
    assert policy.trainable_percent() == pytest.approx(100.0)


@pytest.mark.parametrize("name,scale", [("lora", ALPHA / R), ("rslora", ALPHA / math.sqrt(R)),
                                        ("lora_plus", ALPHA / R), ("lora_fa", ALPHA / R)])
def test_lora_family_shapes_scale_and_targets(arch, name, scale):
    from peft.tuners.lora import LoraLayer

    policy = adapt(fresh_base(arch), _spec(name))
    layers = _layers(policy.model, LoraLayer)
    assert len(layers) == 7 * _n_layers(policy.model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(ALL_LINEAR)
    for lname, layer in layers.items():
        base = layer.get_base_layer()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape == (R, base.in_features) and b.shape == (base.out_features, R)
        assert torch.count_nonzero(b) == 0, "B must start at zero"
        assert torch.count_nonzero(a) > 0, "A must start random"
        assert layer.scaling["default"] == pytest.approx(scale)
        assert not layer.use_dora["default"]
        assert not base.weight.requires_grad
    names = _trainable(policy)
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    if name == "lora_fa":
        assert names and all(".lora_B." in n for n in names)


def test_lora_plus_groups_have_the_ratio(arch):
    for ratio in (16.0, 4.0):
        opts = {} if ratio == 16.0 else {"lr_ratio": ratio}
        policy = adapt(fresh_base(arch), _spec("lora_plus", **opts))
        groups = {g["name"]: g for g in policy.param_groups(1e-4)}
        assert groups["lora_B"]["lr"] / groups["lora_A"]["lr"] == pytest.approx(ratio)
        names = {id(p): n for n, p in policy.model.named_parameters()}
        assert all(".lora_A." in names[id(p)] for p in groups["lora_A"]["params"])
        assert all(".lora_B." in names[id(p)] for p in groups["lora_B"]["params"])
        assert len(groups["lora_A"]["params"]) == len(groups["lora_B"]["params"]) == 7 * _n_layers(policy.model)


def test_lora_fa_freezes_a_and_trains_b(arch):
    policy = adapt(fresh_base(arch), _spec("lora_fa"))
    a_before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if ".lora_A." in n}
    groups = policy.param_groups(1e-2)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_opt for n, p in policy.model.named_parameters() if ".lora_A." in n)
    # Even if something flips requires_grad back on (peft's set_adapter does), A stays out.
    for n, p in policy.model.named_parameters():
        if ".lora_A." in n:
            p.requires_grad_(True)
    train_steps(policy, steps=3)
    for n, p in policy.model.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, a_before[n]), f"{n} moved"
            assert not p.requires_grad
        if ".lora_B." in n:
            assert torch.count_nonzero(p) > 0, f"{n} did not train"


def test_dora_trains_magnitude_initialised_to_weight_norm(arch):
    from peft.tuners.lora import LoraLayer

    policy = adapt(fresh_base(arch), _spec("dora"))
    layers = _layers(policy.model, LoraLayer)
    assert len(layers) == 7 * _n_layers(policy.model)
    for layer in layers.values():
        assert layer.use_dora["default"]
        m = layer.lora_magnitude_vector["default"].weight
        w = layer.get_base_layer().weight
        assert m.requires_grad and m.shape == (w.shape[0],)
        torch.testing.assert_close(m, torch.linalg.norm(w, dim=1))
    names = _trainable(policy)
    assert any("lora_magnitude_vector" in n for n in names)


def test_miss_trains_one_shard_per_module(arch):
    from peft.tuners.miss.layer import MissLayer

    policy = adapt(fresh_base(arch), _spec("miss"))
    layers = _layers(policy.model, MissLayer)
    assert len(layers) == 7 * _n_layers(policy.model)
    for layer in layers.values():
        block = layer.miss_block["default"]
        assert block.shape == (R, layer.get_base_layer().out_features) and block.requires_grad
    assert all(".miss_block." in n for n in _trainable(policy))


@pytest.mark.parametrize("name,which", [("pissa", "top"), ("milora", "bottom")])
def test_svd_init_lies_in_its_singular_subspace(arch, name, which):
    from peft.tuners.lora import LoraLayer

    original = fresh_base(arch)
    w0 = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    ids = batch()
    ref = logits_of(original, ids)
    policy = adapt(original, _spec(name))
    torch.testing.assert_close(logits_of(policy.model, ids), ref, atol=1e-5, rtol=1e-5)
    for lname, layer in _layers(policy.model, LoraLayer).items():
        key = lname.removeprefix("base_model.model.")
        w = w0[key]
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sel = slice(0, R) if which == "top" else slice(-R, None)
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        # The adapter is exactly the chosen rank-r slice of W ...
        torch.testing.assert_close(delta, u[:, sel] @ torch.diag(s[sel]) @ vh[sel], atol=1e-5, rtol=1e-4)
        # ... its column space is that slice's left singular space ...
        proj = u[:, sel] @ u[:, sel].T
        torch.testing.assert_close(proj @ delta, delta, atol=1e-5, rtol=1e-4)
        # ... and the base holds the residual W - BA.
        torch.testing.assert_close(layer.get_base_layer().weight + delta, w, atol=1e-5, rtol=1e-5)
        assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad


def test_pissa_init_is_peft_pissa_init_bit_for_bit(arch):
    """PeRL does PiSSA's init itself (layer by layer, on the accelerator when there is one); on the
    CPU it is peft's `init_lora_weights="pissa"`, bit for bit, and draws nothing from the random stream."""
    from peft import LoraConfig, get_peft_model

    policy = adapt(fresh_base(arch), _spec("pissa"))
    after_perl = torch.rand(4)
    peft_model = get_peft_model(fresh_base(arch), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                             target_modules=list(ALL_LINEAR), bias="none",
                                                             task_type="CAUSAL_LM", init_lora_weights="pissa"))
    assert torch.equal(torch.rand(4), after_perl)  # fresh_base reseeds: the same draws follow both builds
    want = peft_model.state_dict()
    got = policy.model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]


def test_adalora_shapes_and_budget_shrinks(arch):
    from peft.tuners.adalora import SVDLinear

    steps = 20
    policy = adapt(fresh_base(arch), _spec("adalora", init_r=8, target_r=4, tinit=2, tfinal=5), total_steps=steps)
    layers = _layers(policy.model, SVDLinear)
    n = 7 * _n_layers(policy.model)
    assert len(layers) == n
    for layer in layers.values():
        base = layer.get_base_layer()
        assert layer.lora_A["default"].shape == (8, base.in_features)
        assert layer.lora_E["default"].shape == (8, 1)
        assert layer.lora_B["default"].shape == (base.out_features, 8)
    method = METHODS["adalora"]
    assert method.budget(policy) == 0  # E starts at zero in peft; ranks appear as E trains
    budgets = []
    opt = torch.optim.AdamW(policy.param_groups(1e-2), lr=1e-2)
    policy.model.train()
    for step in range(1, steps + 1):
        ids = batch(step, n=4, length=16)
        loss = policy.model(input_ids=ids).logits.float().pow(2).mean() + policy.extra_loss()
        loss.backward()
        opt.step()
        policy.after_optimizer_step(step)
        budgets.append(method.budget(policy))
        opt.zero_grad()
    assert budgets[1] == 8 * n, budgets  # warm-up (tinit): the full initial budget is alive
    assert budgets[-1] == 4 * n, budgets  # after the schedule: exactly the target budget
    assert budgets[-1] < max(budgets)
    assert all(b2 <= b1 for b1, b2 in zip(budgets[2:], budgets[3:])), budgets  # monotone once pruning starts
    pattern = policy.model.peft_config["default"].rank_pattern
    assert pattern, "update_and_allocate did not record a rank pattern"


def test_adalora_schedule_derived_from_run_length(arch):
    policy = adapt(fresh_base(arch), _spec("adalora"), total_steps=1000)
    cfg = policy.model.peft_config["default"]
    assert (cfg.total_step, cfg.tinit, cfg.tfinal) == (1000, 100, 200)
    assert (cfg.init_r, cfg.target_r) == (12, 8)


def test_adalora_regulariser_matches_peft_forward(arch):
    policy = adapt(fresh_base(arch), _spec("adalora", init_r=8, target_r=4), total_steps=10)
    train_steps(policy, steps=2)
    ids = batch(5, n=2, length=10)
    with torch.no_grad():
        plain = policy.model(input_ids=ids)
        logits = plain.logits.float()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        with_labels = policy.model(input_ids=ids, labels=ids).loss  # peft adds orth reg here
    extra = policy.extra_loss()
    assert extra.requires_grad and extra.item() > 0
    torch.testing.assert_close(with_labels - ce, extra.detach(), atol=1e-5, rtol=1e-4)


def test_vera_shares_frozen_projections(arch):
    from peft.tuners.vera.layer import VeraLayer

    policy = adapt(fresh_base(arch), _spec("vera"))
    layers = _layers(policy.model, VeraLayer)
    assert len(layers) == 7 * _n_layers(policy.model)
    a_ids = {id(layer.vera_A["default"]) for layer in layers.values()}
    b_ids = {id(layer.vera_B["default"]) for layer in layers.values()}
    assert len(a_ids) == 1 and len(b_ids) == 1, "VeRA's A and B must be one shared pair"
    shared_a = next(iter(layers.values())).vera_A["default"]
    assert not shared_a.requires_grad and shared_a.shape[0] == R
    for layer in layers.values():
        assert layer.vera_lambda_d["default"].shape == (R,)
        assert layer.vera_lambda_b["default"].shape == (layer.get_base_layer().out_features,)
    names = _trainable(policy)
    assert names and all("vera_lambda_" in n for n in names)


def test_ia3_scales_exactly_k_v_and_down_input(arch):
    from peft.tuners.ia3 import IA3Layer

    policy = adapt(fresh_base(arch), _spec("ia3"))
    layers = _layers(policy.model, IA3Layer)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"k_proj", "v_proj", "down_proj"}
    assert len(layers) == 3 * _n_layers(policy.model)
    torch.manual_seed(3)
    for name, layer in layers.items():
        vec = layer.ia3_l["default"]
        with torch.no_grad():
            vec.uniform_(0.5, 1.5)
        base = layer.get_base_layer()
        x = torch.randn(3, base.in_features)
        with torch.no_grad():
            got = layer(x)
            if name.endswith("down_proj"):
                assert layer.is_feedforward and vec.shape == (1, base.in_features)
                want = base(x * vec.flatten())
            else:
                assert not layer.is_feedforward and vec.shape == (base.out_features, 1)
                want = base(x) * vec.flatten()
        torch.testing.assert_close(got, want)
    assert all(".ia3_l." in n for n in _trainable(policy))


def test_ln_tuning_trains_only_norms(arch):
    base = fresh_base(arch)
    norm_params = sum(m.weight.numel() for n, m in base.named_modules() if type(m).__name__.endswith("RMSNorm"))
    n_norms = sum(1 for m in base.modules() if type(m).__name__.endswith("RMSNorm"))
    policy = adapt(base, _spec("ln_tuning"))
    assert n_norms == 2 * _n_layers(policy.model) + 1
    assert policy.num_trainable() == norm_params
    modules = dict(policy.model.named_modules())
    for name in _trainable(policy):
        owner = modules[name.rsplit(".", 1)[0]]
        assert type(owner).__name__.endswith("RMSNorm"), name


@pytest.mark.parametrize("name", sorted(EXPECTED - {"full"}))
def test_base_weights_frozen(arch, name):
    policy = adapt(fresh_base(arch), _spec(name), total_steps=10)
    embed = policy.model.get_input_embeddings().weight
    assert not embed.requires_grad
    assert 0 < policy.num_trainable() < policy.base_param_count


# ------------------------------------------------------------------------------------------------
# TinyLoRA (arXiv 2602.04118): W + B (sum_i v_i P_i) A, B A the frozen top-r SVD of W, v trained
# ------------------------------------------------------------------------------------------------


def _tiny_layers(model):
    from peft.tuners.tinylora import TinyLoraLayer

    return _layers(model, TinyLoraLayer)


def test_tinylora_defaults_are_the_papers_13_parameters(arch):
    policy = adapt(fresh_base(arch), {"name": "tinylora"})
    assert policy.options == {"r": 2, "u": 13, "weight_tying": 1.0, "projection_seed": 42, "save_projection": True}
    layers = _tiny_layers(policy.model)
    assert len(layers) == 7 * _n_layers(policy.model)
    (name, v), = _trainable(policy).items()  # one vector for the whole model ...
    assert policy.num_trainable() == 13 and v.shape == (13,)
    assert name == "base_model.tinylora_v.default.0"  # ... registered once, outside every decoder layer
    assert [n for n, p in policy.model.named_parameters(remove_duplicate=False) if p.requires_grad] == [name]
    for layer in layers.values():  # ... and referenced by every adapted module
        assert layer.tinylora_v["default"][layer._tinylora_v_key["default"]] is v
    assert torch.count_nonzero(v) == 0


@pytest.mark.parametrize("tying", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("u", [1, 13])
def test_tinylora_trains_u_per_group(tying, u):
    """Trainable count = u x groups, groups = round(modules x (1 - weight_tying)), at least 1 (peft's rule,
    written out here), each module bound to its group's vector."""
    policy = adapt(fresh_base("tiny-qwen2"), {"name": "tinylora", "u": u, "weight_tying": tying})
    modules = 7 * _n_layers(policy.model)
    groups = max(1, round(modules * (1 - tying)))
    assert policy.num_trainable() == u * groups
    vectors = {id(p) for _, p in policy.trainable_parameters()}
    assert len(vectors) == groups
    bound = {id(layer.tinylora_v["default"][layer._tinylora_v_key["default"]])
             for layer in _tiny_layers(policy.model).values()}
    assert bound == vectors  # every vector is used, and only trained vectors are used


def test_tinylora_svd_factors_and_projections_are_frozen_and_the_top_r_svd(arch):
    original = fresh_base(arch)
    w0 = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    policy = adapt(original, {"name": "tinylora", "weight_tying": 0.5})
    layers = _tiny_layers(policy.model)
    frozen = {n: t.detach().clone() for n, t in policy.model.state_dict().items() if "tinylora_v" not in n}
    for lname, layer in layers.items():
        w = w0[lname.removeprefix("base_model.model.")]
        u_, s, vh = torch.linalg.svd(w, full_matrices=False)
        a, b, p = layer.tinylora_A["default"], layer.tinylora_B["default"], layer.tinylora_P["default"]
        assert a.shape == (2, w.shape[1]) and b.shape == (w.shape[0], 2) and p.shape == (13, 2, 2)
        torch.testing.assert_close(b @ a, u_[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1))  # sqrt(S) on each side
        for t in (a, b, p):  # buffers: nothing an optimizer could reach
            assert not isinstance(t, nn.Parameter) and not t.requires_grad
    assert not any(id(layer.tinylora_P["default"]) == id(other.tinylora_P["default"])
                   for other in layers.values() for layer in layers.values() if layer is not other)
    in_opt = {id(p) for g in policy.param_groups(1e-2) for p in g["params"]}
    assert in_opt == {id(p) for _, p in policy.trainable_parameters()}
    train_steps(policy, steps=3)
    after = policy.model.state_dict()
    moved = [n for n in frozen if not torch.equal(after[n], frozen[n])]
    assert not moved, moved  # base weights, A, B, P: bit for bit
    assert all(torch.count_nonzero(p) > 0 for _, p in policy.trainable_parameters())


def test_tinylora_is_the_base_at_init_and_moves_with_v(arch):
    base = fresh_base(arch)
    ids = batch()
    want = logits_of(base, ids)
    policy = adapt(base, {"name": "tinylora"})
    assert torch.equal(logits_of(policy.model, ids), want)  # v = 0: exactly the base
    (_, v), = _trainable(policy).items()
    with torch.no_grad():
        v.fill_(0.05)
    assert (logits_of(policy.model, ids) - want).abs().max() > 1e-3
    with policy.model.disable_adapter():  # the reference policy: the adapter off is the base again
        assert torch.equal(logits_of(policy.model, ids), want)

