"""Spectral analysis reproduces the qualitative claims on constructed cases (paper Figure 3)."""

import json

import numpy as np
import pytest
import torch

from conftest import fresh_base, train_steps
from perl.analysis import module_spectrum, plot_spectra, update_spectrum
from perl.methods import adapt
from perl.sync import merged_weights


def _w(out=96, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    s = torch.linspace(5.0, 0.05, min(out, inp))  # a clear spectrum, like a pretrained weight
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T, u, v


def test_constructed_updates_concentrate_where_expected():
    w, u, v = _w()
    g = torch.Generator().manual_seed(1)
    r = 6
    top = u[:, :r] @ torch.randn(r, r, generator=g) @ v[:, :r].T
    bottom = u[:, 64 - r : 64] @ torch.randn(r, r, generator=g) @ v[:, 64 - r : 64].T
    dense = 0.01 * torch.randn(w.shape, generator=g)
    s_top = module_spectrum("top", w, w + top)
    s_bottom = module_spectrum("bottom", w, w + bottom)
    s_dense = module_spectrum("dense", w, w + dense)
    assert s_top.top_share(r / 64) > 0.99 and s_bottom.top_share(1 - r / 64) < 0.01
    assert 0.05 < s_dense.top_share(0.1) < 0.2  # spread evenly: ~10% of the mass on 10% of directions
    assert s_top.energy[r - 1] == pytest.approx(1.0) and s_dense.energy[r - 1] < 0.5  # low-rank vs full-rank
    assert module_spectrum("same", w, w.clone()) is None


@pytest.mark.parametrize("name,where", [("pissa", "top"), ("milora", "bottom")])
def test_trained_svd_methods_update_their_subspace(name, where):
    original = fresh_base("tiny-qwen2")
    base_pairs = list(merged_weights(original, torch.float32))
    policy = adapt(original, {"name": name, "rank": 4, "alpha": 8.0, "dropout": 0.0})
    train_steps(policy, steps=3, lr=1e-3)
    report = update_spectrum(base_pairs, merged_weights(policy, torch.float32))
    assert len(report.modules) == 14
    top = np.array([m.top_share(4 / len(m.alignment)) for m in report.modules])  # the r principal directions
    bottom = np.array([1 - m.top_share(1 - 4 / len(m.alignment)) for m in report.modules])  # the r minor ones
    mine, other = (top, bottom) if where == "top" else (bottom, top)
    # uniform spreading would put 4/32..4/128 of the mass on either end; measured: 0.84-0.98 (PiSSA),
    # 0.49-0.95 (MiLoRA, already drifting towards principal directions, as the paper reports)
    assert mine.mean() > 0.7 and mine.min() > 0.4, mine
    assert other.max() < 0.05, other


def test_random_init_lora_update_is_not_concentrated():
    original = fresh_base("tiny-qwen2")
    base_pairs = list(merged_weights(original, torch.float32))
    policy = adapt(original, {"name": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0})
    train_steps(policy, steps=3, lr=1e-3)
    report = update_spectrum(base_pairs, merged_weights(policy, torch.float32))
    top = np.array([m.top_share(4 / len(m.alignment)) for m in report.modules])
    assert top.mean() < 0.2, top


def test_full_update_spreads_and_plot_and_json(tmp_path):
    original = fresh_base("tiny-qwen2")
    base_pairs = list(merged_weights(original, torch.float32))
    policy = adapt(original, {"name": "full"})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if p.dim() == 2:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    report = update_spectrum(base_pairs, merged_weights(policy, torch.float32))
    assert 0.05 < report.top_share(0.1) < 0.2
    d = report.to_dict()
    assert len(d["mean_alignment"]) == 50 and abs(sum(d["mean_alignment"]) - 1) < 1e-6
    assert d["mean_energy"][-1] == pytest.approx(1.0)
    json.dumps(d)
    png = plot_spectra({"full": report}, str(tmp_path / "spectrum.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # CLI subprocesses: a few seconds of imports each
def test_spectrum_cli_on_checkpoints(tmp_path):
    import os
    import subprocess
    import sys

    base_dir = tmp_path / "base"
    fresh_base("tiny-llama").save_pretrained(base_dir)
    ckpts = []
    for name in ("pissa", "milora"):
        policy = adapt(fresh_base("tiny-llama"), {"name": name, "rank": 4, "alpha": 8.0, "dropout": 0.0})
        train_steps(policy, steps=2, lr=1e-3)
        ckpts += ["--adapter", policy.save(str(tmp_path / name))]
    out = tmp_path / "spec"
    proc = subprocess.run([sys.executable, "-m", "perl.cli", "spectrum", "--base", str(base_dir), *ckpts, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "spectrum.json").read_text())
    assert set(data) == {"pissa", "milora"}
    assert data["pissa"]["top10_share"] > 0.5 > data["milora"]["top10_share"]
    assert data["milora"]["bottom10_share"] > 0.5 > data["pissa"]["bottom10_share"]
    assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
