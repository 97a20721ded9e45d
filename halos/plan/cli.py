"""`halos plan SUITE_FILE [--out results/SUITE/plan.md] [--gpu a100] [--mfu 0.4] [--estimate]`:
every job's tokens, FLOPs, hours and peak memory per GPU before anything runs; the table on
stdout (markdown), and with --out also the .md and the .csv beside it. Exit 2 on a bad suite or
when --require-fit is given and a row does not fit."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from halos.plan.hardware import DEFAULT_GPU, DEFAULT_MFU, GPUS

    parser = argparse.ArgumentParser(prog="halos plan", description=(
        "What a suite costs before it runs: tokens, FLOPs, GPU-hours and memory per GPU of "
        "every job. Tokens are counted from data/{dataset}/ when prepared, else estimated."))
    parser.add_argument("suite", help="suite file, e.g. configs/suites/archangel.yaml")
    parser.add_argument("--out", help="write the markdown here and the CSV beside it (.csv)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default=None,
                        help=f"GPU type of rows without gpu_model (default: {DEFAULT_GPU})")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"assumed model FLOPs utilization on GPUs (default: {DEFAULT_MFU})")
    parser.add_argument("--estimate", action="store_true",
                        help="never tokenize: estimate tokens from the tables (fast)")
    parser.add_argument("--require-fit", action="store_true",
                        help="exit 2 if any training job does not fit its GPUs")
    return parser


def assumptions(options) -> str:
    from halos.plan.hardware import CPU_CORE_FLOPS, CPU_MFU, DEFAULT_GPU, GPUS

    gpu = GPUS[options.gpu or DEFAULT_GPU]
    return (f"Assumed: {gpu.name} GPUs ({gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 peak, "
            f"{gpu.memory_gb:.0f} GB) at {options.mfu:.0%} MFU unless a row names its "
            f"gpu_model; CPU rows {CPU_CORE_FLOPS / 1e9:.0f} GFLOP/s per core at {CPU_MFU:.0%}. "
            "FLOPs: 6N per trained token (8N with activation checkpointing), 2N per scored or "
            "generated token. Memory per GPU: DeepSpeed's model-state estimators + activations "
            "(Korthikanti et al. 2022) + the chunked LM head + 2 GB runtime overhead.")


def main_plan(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: must be in (0, 1]")
    if args.out and Path(args.out).suffix != ".md":
        raise ValueError(f"--out {args.out!r}: expected a .md file (the .csv goes beside it)")
    import halos.suite as hs
    from halos.plan import render
    from halos.plan.jobs import Options, Planner

    suite = hs.load_suite(args.suite)
    options = Options(gpu=args.gpu, mfu=args.mfu, count=not args.estimate)
    rows = Planner(suite, options).plan()
    text = render.markdown(rows, f"suite {suite.name} ({len(suite.runs)} runs)",
                           assumptions(options))
    print(text, end="", flush=True)
    if args.out:
        from halos.files import atomic_file

        out = Path(args.out)
        with atomic_file(out.with_suffix(".csv")) as handle:
            handle.write(render.to_csv(rows))
        with atomic_file(out) as handle:
            handle.write(text)
    misfits = [f"{r.model}/{r.dataset}/{r.loss} ({r.rule})" for r in rows if not r.fits]
    if args.require_fit and misfits:
        raise ValueError(f"--require-fit: {len(misfits)} jobs do not fit: {', '.join(misfits)}")
    return 0
