"""A suite of reference-based losses on one (model, dataset): the halos DAG against TRL running
its trainers one after another, total wall time side by side.

halos: one `snakemake --cores 2` over a generated suite (this model, this data, one row per
loss, no evaluation) whose targets are the losses' model folders, so the DAG runs what a suite
needs before evaluation: `halos data prepare`, one reference pass of the base model
(`ref_logps_base`: every view any row needs, KTO's KL partners included, tokenizing once into
the data's cache) and one `halos align` per loss reading that cache and that pass. TRL: for each
loss its own fresh process (`bench_dpo_vs_trl.py`'s worker), `DPOTrainer` with the loss's
`loss_type` (sigmoid, ipo, robust) or `KTOTrainer`, default settings (the reference model runs in
every step) or `--trl precompute`, each saving its model as halos' jobs do.

Same data (bench_dpo_vs_trl's HH-like pairs), same model, micro batch 8, one epoch, lr 5e-6,
beta 0.1 (IPO tau 0.1, rDPO label noise 0.2), fp32, max length / prompt length as
bench_dpo_vs_trl's defaults for the model (SmolLM2: 192 / 128).

    python benchmarks/bench_suite_vs_trl.py --model smollm2 --pairs 32 \\
        --out benchmarks/results/suite_vs_trl_smollm2.json

Printed: wall time of each side and of each of its jobs, peak RSS (halos: the largest job's
max RSS from Snakemake's benchmark files; TRL: the largest process), the ratio, and how many
reference passes and tokenizations the DAG ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_dpo_vs_trl as bench
import yaml

REPO = Path(__file__).resolve().parent.parent
MODEL_ROW, DATA_ROW = "bench-model", "bench-data"


def write_suite(work: Path, model_dir: Path, data: Path, losses: list[str], max_length: int,
                max_prompt: int) -> Path:
    """The suite file and its three tables: this model, this data, a row per loss."""
    suite = work / "suite"
    suite.mkdir(parents=True, exist_ok=True)
    params = f"{bench.model_params(model_dir)['n_all'] / 1e6:.0f}M"
    models = {MODEL_ROW: {"source": str(model_dir.resolve()), "params": params,
                          "family": "bench", "cpus": os.cpu_count() or 1, "mem_mb": 16000,
                          "runtime": 120, "eval_runtime": 60,
                          "deepspeed": "zero0", "precision": "fp32", "attn_implementation": "sdpa",
                          "packing": True, "micro_batch_size": bench.MICRO_BATCH}}
    datasets = {DATA_ROW: {"loader": "local", "source": str(data.resolve()),
                           "max_length": max_length, "max_prompt_length": max_prompt,
                           "eval_examples": 0}}
    rows = {loss: {"class": loss, "from_sft": False, "batch_size": bench.MICRO_BATCH,
                   "learning_rate": bench.LR, "epochs": 1, "params": bench.HALOS_PARAMS[loss]}
            for loss in losses}
    tables = {"models": models, "datasets": datasets, "losses": rows}
    for name, table in tables.items():
        (suite / f"{name}.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
    spec = {"name": "bench", "tables": {name: f"{name}.yaml" for name in tables},
            "models": [MODEL_ROW], "datasets": [DATA_ROW], "losses": "all",
            "eval": {"preference": False}, "publish": {"enabled": False}}
    (suite / "suite.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return suite / "suite.yaml"


def run_halos_suite(work: Path, suite_file: Path, losses: list[str]) -> dict:
    """One snakemake over the losses' model folders; per-job seconds and max RSS from the
    `benchmark:` files every rule writes."""
    import halos.suite as hs

    layout = hs.load_suite(str(suite_file)).layout
    targets = [layout.model(MODEL_ROW, DATA_ROW, loss) for loss in losses]
    dag = work / "dag"
    dag.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                    "--directory", str(dag), "--cores", str(os.cpu_count() or 1), *targets,
                    "--config", f"suite={suite_file}"], check=True, cwd=dag, env=env,
                   stdout=subprocess.DEVNULL, stderr=open(work / "snakemake.log", "w"))  # noqa: SIM115
    wall = time.perf_counter() - t0
    jobs = {}
    for path in sorted((dag / "logs").rglob("*benchmark.tsv")):
        with path.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        jobs[str(path.relative_to(dag / "logs")).removesuffix(".benchmark.tsv")] = {
            "s": float(row["s"]), "max_rss_mb": float(row["max_rss"])}
    # "[halos] DATA SPLIT (VIEW): tokenized N: ..." per split a job reads; "(read from CACHE)"
    # ends it where the job read the tokenization cache instead of tokenizing.
    counts = [line for log in (dag / "logs").rglob("*.log") for line in log.read_text().splitlines()
              if line.startswith("[halos] ") and ": tokenized " in line]
    losses_of = {loss: statistics.fmean(r["loss"] for r in bench.train_rows(
        dag / layout.run(MODEL_ROW, DATA_ROW, loss) / "metrics.jsonl")) for loss in losses}
    return {"wall_s": wall, "jobs": jobs, "peak_rss_mb": max(j["max_rss_mb"] for j in jobs.values()),
            "reference_passes": sum("ref_logps" in name for name in jobs),
            "tokenizations": sum("(read from " not in line for line in counts),
            "tokenization_cache_reads": sum("(read from " in line for line in counts),
            "mean_loss": losses_of}


def run_trl(work: Path, data: Path, model_dir: Path, losses: list[str], args) -> dict:
    """Each loss's TRL trainer in its own fresh process, one after another."""
    runs = {}
    t0 = time.perf_counter()
    for loss in losses:
        options = SimpleNamespace(loss=loss, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, save_model=True)
        run_dir = work / "trl" / loss
        result = bench.run_config(f"trl-{args.trl}", data, model_dir, run_dir, options)
        runs[loss] = {k: result[k] for k in ("e2e_s", "train_s", "peak_rss_mb", "mean_loss",
                                             "steps", "foreign_cpu_frac")}
        print(f"  trl {loss:<7} {result['e2e_s']:7.1f}s  peak RSS {result['peak_rss_mb']:.0f} MB",
              flush=True)
    return {"wall_s": time.perf_counter() - t0, "runs": runs,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs.values())}


def print_report(halos: dict, trl: dict, args) -> None:
    print(f"\nhalos DAG ({len(args.loss_list)} losses, packing): {halos['wall_s']:.1f}s, "
          f"peak RSS {halos['peak_rss_mb'] / 1024:.2f} GB, {halos['reference_passes']} reference "
          f"pass(es), {halos['tokenizations']} (view, split) tokenizations, "
          f"{halos['tokenization_cache_reads']} read back from the cache")
    for name, job in halos["jobs"].items():
        print(f"  {name:<50} {job['s']:7.1f}s  {job['max_rss_mb']:7.0f} MB")
    print(f"TRL {args.trl}, one trainer after another: {trl['wall_s']:.1f}s, peak RSS "
          f"{trl['peak_rss_mb'] / 1024:.2f} GB")
    ratio = trl["wall_s"] / halos["wall_s"]
    print(f"\nsuite wall time TRL / halos: {ratio:.2f}x (target >= 4x: "
          f"{'met' if ratio >= 4 else 'MISSED'}); peak RSS halos / TRL "
          f"{halos['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--model", choices=tuple(bench.LENGTHS), default="smollm2")
    parser.add_argument("--losses", default="dpo,kto,ipo,robust")
    parser.add_argument("--trl", choices=("default", "precompute"), default="default")
    parser.add_argument("--sides", default="halos,trl", help="run only one side: halos or trl")
    parser.add_argument("--work", default="", help="keep data/model/runs here (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/suite_vs_trl.json")
    args = parser.parse_args()
    args.loss_list = [loss for loss in args.losses.split(",") if loss]
    unknown = sorted(set(args.loss_list) - set(bench.LOSSES))
    if unknown:
        parser.error(f"--losses: unknown {unknown}; choose from {sorted(bench.LOSSES)}")
    args.max_length, args.max_prompt_length = bench.LENGTHS[args.model]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_suite_"))
    data, model_dir = bench.prepare(work, args.pairs, args.model)
    sides = args.sides.split(",")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "pairs": args.pairs, "model": args.model,
              "losses": args.loss_list, "trl_mode": args.trl, "max_length": args.max_length,
              "max_prompt_length": args.max_prompt_length, "cpu_count": os.cpu_count()}
    if "halos" in sides:
        suite_file = write_suite(work, model_dir, data, args.loss_list, args.max_length,
                                 args.max_prompt_length)
        result["halos"] = run_halos_suite(work, suite_file, args.loss_list)
        print(f"halos DAG done: {result['halos']['wall_s']:.1f}s", flush=True)
    if "trl" in sides:
        result["trl"] = run_trl(work, data, model_dir, args.loss_list, args)
    if "halos" in result and "trl" in result:
        print_report(result["halos"], result["trl"], args)
        result["ratio_wall_trl_over_halos"] = result["trl"]["wall_s"] / result["halos"]["wall_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out} (work: {work})")


if __name__ == "__main__":
    main()
