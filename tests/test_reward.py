"""The verifiable math reward: equivalence cases, adversarial inputs, time limits, concurrency."""

import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from perl.reward import FormatConfig, MathReward, RewardConfig, compute_score, extract_answer, reward_from_kwargs

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def reward():
    r = MathReward(RewardConfig(timeout_s=TIMEOUT, workers=2))
    yield r
    r.pool.close()


def wrap(ans: str) -> str:
    return f"<think>Let me compute.</think>\nThe answer is $\\boxed{{{ans}}}$."


# (predicted answer, ground truth, equivalent?)
EQUIVALENCE = [
    # integers
    ("42", "42", True), ("-7", "-7", True), ("042", "42", True), ("1,000", "1000", True), ("41", "42", False),
    ("+5", "5", True), ("-5", "5", False),
    # fractions
    ("\\frac{1}{2}", "1/2", True), ("\\dfrac{3}{6}", "\\frac{1}{2}", True), ("\\frac12", "\\frac{1}{2}", True),
    ("2/4", "\\frac{1}{2}", True), ("\\frac{2}{3}", "\\frac{3}{2}", False), ("-\\frac{1}{3}", "\\frac{-1}{3}", True),
    ("\\frac{7}{2}", "3.5", True),
    # decimals
    ("0.5", "\\frac{1}{2}", True), ("3.14", "3.14", True), ("3.140", "3.14", True), (".25", "0.25", True),
    ("0.333", "\\frac{1}{3}", False), ("2.5", "2.6", False),
    # percentages
    ("50\\%", "50", True), ("50\\%", "50\\%", True), ("25\\%", "50\\%", False),
    # radicals
    ("\\sqrt{8}", "2\\sqrt{2}", True), ("2\\sqrt{3}", "\\sqrt{12}", True), ("\\sqrt{2}", "\\sqrt{3}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("3\\sqrt{2}", "\\sqrt{18}", True),
    ("\\sqrt[3]{8}", "2", True),
    # intervals
    ("[1,2)", "[1,2)", True), ("(1,2]", "[1,2)", False), ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("[0,\\infty)", "[0, \\infty)", True), ("(0,1)", "(0,2)", False),
    # sets
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True), ("\\{1,2\\}", "\\{1,2,3\\}", False), ("\\{-1, 1\\}", "\\{1,-1\\}", True),
    # tuples
    ("(1,2)", "(1,2)", True), ("(2,1)", "(1,2)", False), ("(1, \\frac{1}{2})", "(1, 0.5)", True),
    # expressions
    ("x^2+2x+1", "(x+1)^2", True), ("2x+2", "2(x+1)", True), ("x^2-1", "(x-1)(x+1)", True),
    ("x^2+1", "(x+1)^2", False), ("\\frac{x}{2}", "0.5x", True), ("\\pi", "\\pi", True), ("2\\pi", "\\pi", False),
    ("e^{2}", "e^2", True), ("\\sin^2 x + \\cos^2 x", "1", True), ("\\log_2 8", "3", True),
    ("\\binom{5}{2}", "10", True), ("5!", "120", True), ("x=3", "3", True),
    # units
    ("5 \\text{ cm}", "5", True), ("12\\,\\text{m}", "12", True), ("30^\\circ", "30", True), ("7 \\text{ cm}", "5", False),
    # text answers
    ("\\text{East}", "\\text{East}", True), ("\\text{(B)}", "\\text{(B)}", True), ("\\text{west}", "\\text{East}", False),
    # complex numbers and scientific notation
    ("3+4i", "3+4i", True), ("3-4i", "3+4i", False), ("1.5\\times 10^{3}", "1500", True), ("2^{10}", "1024", True),
]


def test_enough_cases():
    assert len(EQUIVALENCE) >= 60
    assert sum(1 for *_, ok in EQUIVALENCE if not ok) >= 15


def test_equivalence_cases(reward):
    results = reward.score_batch([wrap(p) for p, _, _ in EQUIVALENCE], [g for _, g, _ in EQUIVALENCE])
    wrong = [(p, g, ok, r["acc"], r["status"]) for (p, g, ok), r in zip(EQUIVALENCE, results) if r["acc"] != float(ok)]
    assert not wrong, wrong
    assert all(r["status"] == "ok" for r in results)
    assert all(r["score"] == r["acc"] for r in results)


ADVERSARIAL = [
    None, "", "   ", b"\xff\xfe\x00</think>\\boxed{4}", "</think>" + "a" * 3_000_000 + "\\boxed{4}",
    "</think>\\boxed{3", "</think>\\boxed{{{{{{{{}", "</think>\\boxed{}", "</think>" + "\\boxed{" * 5000 + "}" * 5000,
    "</think>\\boxed{\\boxed{\\boxed{4}}}", "</think>\\boxed{10^{10^{10^{10^{10}}}}}", "</think>\\boxed{9^{9^{9^{9^{9}}}}}",
    "</think>\\boxed{\\frac{1}{0}}", "</think>\\boxed{\\left( \\right.}", "</think>\\boxed{" + "x+" * 20000 + "x}",
    "</think>\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}", "</think>\\boxed{\\int_0^\\infty e^{-x^{x}}dx}",
    "no think block \\boxed{4}", "</think>\\boxed{\\undefinedmacro{4}}", 12345, ["a", "list"],
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_never_raise_or_hang(reward, text):
    t0 = time.perf_counter()
    result = reward.score(text, "4")
    elapsed = time.perf_counter() - t0
    assert elapsed < TIMEOUT + 3.0, f"took {elapsed:.1f}s"  # the limit plus kill/restart slack
    assert result["score"] in (0.0, 1.0) and result["acc"] in (0.0, 1.0)
    assert result["status"] in {"ok", "empty", "no_think", "no_answer", "unbalanced", "too_long", "timeout", "error"}


def test_adversarial_cases_expected_verdicts(reward):
    assert reward.score(b"\xff\xfe</think>\\boxed{4}", "4")["acc"] == 1.0  # bad bytes before a good answer
    assert reward.score("</think>\\boxed{\\boxed{\\boxed{4}}}", "4")["acc"] == 1.0
    assert reward.score("</think>" + "a" * 3_000_000 + "\\boxed{4}", "4")["acc"] == 1.0
    assert reward.score("</think>\\boxed{3", "3")["status"] == "unbalanced"
    assert reward.score("no think block \\boxed{4}", "4")["status"] == "no_think"
    assert reward.score("</think>\\boxed{4}", None)["status"] == "no_ground_truth"


def test_timeout_is_counted_not_lost(reward):
    before = reward.stats["timeout"]
    r = reward.score("</think>\\boxed{10^{10^{10^{10^{10}}}}}", "7")
    assert r["status"] == "timeout" and r["timed_out"] == 1.0 and r["score"] == 0.0
    assert reward.stats["timeout"] == before + 1
    assert reward.score(wrap("x^2+2x+1"), "(x+1)^2")["acc"] == 1.0  # the pool recovers


def test_format_strictness_is_configurable():
    text = "<think>first \\boxed{1}</think> then \\boxed{2} and finally \\boxed{3}"
    assert extract_answer(text) == ("3", "ok")
    assert extract_answer(text, FormatConfig(boxed="first")) == ("2", "ok")
    assert extract_answer("\\boxed{5}", FormatConfig(require_think=False)) == ("5", "ok")
    assert extract_answer("\\boxed{5}")[1] == "no_think"
    assert extract_answer("</think>\nAnswer: 17")[1] == "no_answer"
    assert extract_answer("</think>\nAnswer: $17$.", FormatConfig(answer_line_fallback=True)) == ("17", "ok")
    assert extract_answer("</think>\\boxed{" + "1" * 2000 + "}")[1] == "too_long"
    assert extract_answer("</think>\\boxed 7 apples") == ("7", "ok")


def test_the_last_number_fallback_reads_what_small_instruct_models_write():
    lenient = FormatConfig(require_think=False, last_number_fallback=True)
    assert extract_answer("5 + 2 = 7", lenient) == ("7", "ok")  # SmolLM2's usual answer
    assert extract_answer("The answer is 1,250.", lenient) == ("1250", "ok")
    assert extract_answer("x = -3/4 so", lenient) == ("-3/4", "ok")
    assert extract_answer("5 + 2 = 7 \\boxed{8}", lenient) == ("8", "ok")  # a box still wins
    assert extract_answer("no digits here", lenient) == (None, "no_answer")
    assert extract_answer("5 + 2 = 7", FormatConfig(require_think=False)) == (None, "no_answer")  # off by default
    reward = reward_from_kwargs({"require_think": False, "last_number_fallback": True})
    assert [s["acc"] for s in reward.score_batch(["3 + 4 = 7", "3 + 4 = 8"], ["7", "7"])] == [1.0, 0.0]
    with pytest.raises(ValueError, match="reward.boxed"):
        FormatConfig(boxed="middle")


def test_verl_custom_reward_signature():
    result = compute_score("openai/gsm8k", wrap("\\frac{3}{4}"), "0.75", extra_info={"index": 1})
    assert result["score"] == 1.0 and result["acc"] == 1.0 and result["pred"] == "\\frac{3}{4}"
    assert set(result) >= {"score", "acc", "pred", "timed_out"}


def test_eight_threads_at_once(reward):
    cases = EQUIVALENCE[:40]

    def one(i):
        p, g, ok = cases[i % len(cases)]
        return reward.score(wrap(p), g)["acc"] == float(ok)

    with ThreadPoolExecutor(max_workers=8) as ex:
        assert all(ex.map(one, range(64)))


def _score_in_child(args):
    pred, gold = args
    return compute_score("x", wrap(pred), gold)["acc"]


def test_from_a_ray_free_process_pool():
    import multiprocessing as mp

    cases = [("\\sqrt{8}", "2\\sqrt{2}", 1.0), ("x^2-1", "(x-1)(x+1)", 1.0), ("41", "42", 0.0), ("[1,2)", "(1,2]", 0.0)]
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as ex:
        got = list(ex.map(_score_in_child, [(p, g) for p, g, _ in cases]))
    assert got == [ok for *_, ok in cases]


def test_overlong_penalty_matches_verl_dapo_manager():
    import inspect

    import verl.workers.reward_manager.dapo as dapo

    from perl.reward import overlong_penalty

    src = inspect.getsource(dapo)
    assert "min(-exceed_len / overlong_buffer_len * overlong_penalty_factor, 0)" in src  # the formula we mirror
    assert overlong_penalty(100, 1000, 200) == 0.0
    assert overlong_penalty(800, 1000, 200) == 0.0
    assert overlong_penalty(900, 1000, 200, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(1000, 1000, 200, 2.0) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="overlong_buffer.len"):
        overlong_penalty(10, 1000, 0)


def test_loads_through_verls_custom_reward_hook():
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    import perl.reward.verl_reward as entry

    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": entry.__file__, "name": "compute_score", "reward_kwargs": {"require_think": False}}}})
    fn = get_custom_reward_fn(cfg)
    result = fn(data_source="x", solution_str="no think tags \\boxed{12}", ground_truth="12", extra_info={})
    assert result["score"] == 1.0 and result["acc"] == 1.0
    assert all(isinstance(v, (int, float, str)) for v in result.values())
    with pytest.raises(ValueError, match="reward_kwargs"):
        compute_score("x", "</think>\\boxed{1}", "1", strict=True)


def test_pool_survives_every_worker_timing_out_while_others_wait():
    """All workers killed at once must not strand callers waiting for a free worker."""
    from perl.reward import VerifierPool

    pool = VerifierPool(size=2, timeout_s=1.0, grace_s=0.5)
    hang = ("10^{10^{10^{10^{10}}}}", "7")
    try:
        with ThreadPoolExecutor(max_workers=6) as ex:
            futures = [ex.submit(pool.verify, *hang) for _ in range(4)] + [ex.submit(pool.verify, "x^2-1", "(x-1)(x+1)")]
            results = [f.result(timeout=60) for f in futures]
        assert results[:4] == [(False, "timeout")] * 4
        assert results[4] == (True, "ok")
        assert pool.stats["timeout"] == 4
    finally:
        pool.close()
