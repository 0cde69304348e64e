"""`perl prepare`: verl-schema parquet from local files, CHAMP (offline) and synthetic arithmetic."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from perl.data import DEFAULT_TEMPLATE, arithmetic_rows, prepare, to_verl_rows, write_parquet
from perl.reward import MathReward

VERL_COLUMNS = {"data_source", "prompt", "ability", "reward_model", "extra_info"}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "perl.cli", "prepare", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _check_verl_row(row):
    assert set(row) >= VERL_COLUMNS
    prompt = list(row["prompt"])
    assert prompt and prompt[-1]["role"] == "user" and "\\boxed{}" in prompt[-1]["content"]
    assert row["reward_model"]["style"] == "rule" and row["reward_model"]["ground_truth"]


def test_local_jsonl_roundtrip_reports_bad_rows(tmp_path):
    src = tmp_path / "aime_local.jsonl"
    rows = [
        {"problem": "Find 2+2.", "answer": "4"},
        {"problem": "Half of one?", "answer": "\\frac{1}{2}"},
        {"problem": "No answer here"},
        {"question": "Solve x+1=3.", "solution": "2"},
        {"problem": "Prose answer", "answer": "No integer solutions"},
        {"answer": "5"},
        {"problem": "Number answer", "answer": 17},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out.parquet"
    proc = _cli("local", "--input", str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "4 rows kept, 3 skipped" in proc.stdout
    assert "no answer" in proc.stdout and "not verifiable" in proc.stdout and "no question" in proc.stdout
    df = pd.read_parquet(out)
    assert set(df.columns) == VERL_COLUMNS and len(df) == 4
    for row in df.to_dict("records"):
        _check_verl_row(row)
    assert list(df["reward_model"].map(lambda r: r["ground_truth"])) == ["4", "\\frac{1}{2}", "2", "17"]
    assert df["data_source"].unique().tolist() == ["aime_local"]
    assert df.iloc[0]["extra_info"]["question"] == "Find 2+2."


def test_directory_and_parquet_input(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pd.DataFrame([{"problem": "1+1?", "answer": "2"}]).to_parquet(d / "a.parquet")
    (d / "b.json").write_text(json.dumps([{"problem": "3*3?", "answer": "9"}]))
    prepared = prepare("local", input_path=str(d))
    assert [r["reward_model"]["ground_truth"] for r in prepared.rows] == ["2", "9"]


@pytest.mark.slow  # CLI subprocesses: a few seconds of imports each
def test_champ_offline(tmp_path):
    out = tmp_path / "champ.parquet"
    proc = _cli("champ", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(out)
    kept = len(df)
    assert 150 <= kept <= 270
    assert f"{kept} rows kept, {270 - kept} skipped" in proc.stdout  # nothing silently vanishes
    for row in df.head(20).to_dict("records"):
        _check_verl_row(row)
    truths = set(df["reward_model"].map(lambda r: r["ground_truth"]))
    assert "252" in truths  # "C(10, 5), or equivalently 252" normalised
    assert not any("solutions" in t for t in truths)


def test_arithmetic_generator_is_seeded_and_answers_verify():
    a = arithmetic_rows(50, digits=3, seed=1)
    assert a == arithmetic_rows(50, digits=3, seed=1) and a != arithmetic_rows(50, digits=3, seed=2)
    for r in a:
        x, op, y = r["problem"].removeprefix("What is ").rstrip("?").split()
        assert 100 <= int(x) <= 999 and 100 <= int(y) <= 999
        assert int(r["answer"]) == (int(x) + int(y) if op == "+" else int(x) * int(y))
    prepared = to_verl_rows(a, "arith", "train")
    reward = MathReward()
    good = [f"<think>ok</think> \\boxed{{{r['reward_model']['ground_truth']}}}" for r in prepared.rows]
    assert all(s["acc"] == 1.0 for s in reward.score_batch(good, [r["reward_model"]["ground_truth"] for r in prepared.rows]))
    with pytest.raises(ValueError, match="ops"):
        arithmetic_rows(5, ops=("div",))


def test_template_is_configurable_and_checked(tmp_path):
    rows = to_verl_rows([{"problem": "Q?", "answer": "1"}], "x", "test", template="Solve: {question}")
    assert rows.rows[0]["prompt"][0]["content"] == "Solve: Q?"
    with pytest.raises(ValueError, match="question"):
        to_verl_rows([{"problem": "Q?", "answer": "1"}], "x", "test", template="no placeholder")
    assert "{question}" in DEFAULT_TEMPLATE and "<think>" in DEFAULT_TEMPLATE


@pytest.mark.slow  # CLI subprocesses: a few seconds of imports each
def test_hub_sources_fail_clearly_offline(tmp_path):
    proc = _cli("aime24", "--out", str(tmp_path / "a.parquet"))
    assert proc.returncode == 2 and "--input" in proc.stderr and "offline" in proc.stderr
    proc = _cli("local", "--input", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_verl_rlhf_dataset_reads_the_parquet(tmp_path):
    """verl's own dataset class loads the file (tokenizer built in code, chat template applied)."""
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from verl.utils.dataset.rl_dataset import RLHFDataset

    prepared = prepare("arith", n=8)
    path = write_parquet(prepared.rows, str(tmp_path / "arith.parquet"))
    words = sorted({w for r in prepared.rows for w in r["prompt"][0]["content"].split()} | {"user", ":"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    hf_tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 128, "filter_overlong_prompts": False,
                               "cache_dir": str(tmp_path / "cache"), "truncation": "error"})
    ds = RLHFDataset(path, hf_tok, config)
    assert len(ds) == 8
    item = ds[0]
    assert item["reward_model"]["ground_truth"] == prepared.rows[0]["reward_model"]["ground_truth"]
    assert item["data_source"] == "arith"
