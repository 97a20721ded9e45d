"""`halos data prepare`, `halos data mix` and `halos data synthetic`: write normalized files
and print counts. A dataset named on the command line is a row of the datasets table
(configs/datasets.yaml, the one the suites use; `--table` for another)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from halos.data.errors import DataError
from halos.data.mix import mix_datasets
from halos.data.prepare import check_output_folder, prepare_dataset
from halos.data.synthetic import generate


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects key=value, got {item!r}")
        out[key] = value
    return out


def _table_row(name: str, table: str | None) -> dict:
    """The row `name` of the datasets table, validated as the suites validate it."""
    from halos.suite.tables import DATASETS_TABLE, SuiteError, load_table

    path = table or DATASETS_TABLE
    try:
        rows = load_table(path, "datasets")
    except SuiteError as err:
        raise DataError(str(err)) from err
    if name not in rows:
        raise DataError(f"dataset {name!r} is not a row of the datasets table {path}; rows: "
                        f"{sorted(rows)}")
    if "mix" in rows[name]:
        raise DataError(f"dataset {name!r} of {path} is a mix: prepare its parts, then "
                        f"`halos data mix {' '.join('data/' + p for p in rows[name]['mix'])} "
                        f"--out data/{name}`")
    return rows[name]


def _prepare(args: argparse.Namespace) -> int:
    row = _table_row(args.name, args.table) if args.name else {}
    loader = args.loader or row.get("loader")
    source = args.source or row.get("source")
    if not loader or not source:
        raise SystemExit("give a dataset name from the table, or --loader and --source")
    options = {**row.get("options", {}), **_pairs(args.option, "--option")}
    max_examples = {k: int(v) for k, v in _pairs(args.max_examples, "--max-examples").items()}
    report = prepare_dataset(
        loader, source, args.out,
        splits=_pairs(args.split, "--split") or row.get("splits"),
        max_examples=max_examples or row.get("sizes"),
        seed=args.seed if args.seed is not None else row.get("seed", 0),
        on_error=args.on_error or row.get("on_error", "raise"), **options)
    print(report.summary())
    return 0


def _mix(args: argparse.Namespace) -> int:
    counts = mix_datasets(args.parts, args.out)
    print(f"mix of {len(args.parts)} datasets -> {args.out}: "
          + ", ".join(f"{name}={n}" for name, n in counts.items()))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    counts = generate(args.out, seed=args.seed)
    print(f"synthetic (seed {args.seed}) -> {args.out}: "
          + ", ".join(f"{name}={n}" for name, n in counts.items()))
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `data prepare`, `data mix` and `data synthetic` under an existing subparsers object."""
    data = subparsers.add_parser("data", help="prepare datasets as normalized files")
    commands = data.add_subparsers(dest="data_command", required=True)

    prepare = commands.add_parser("prepare", help="load, validate and write a dataset")
    prepare.add_argument("name", nargs="?", help="a row of the datasets table (see --table)")
    prepare.add_argument("--table", "--config", dest="table",
                         help="datasets table (default: configs/datasets.yaml)")
    prepare.add_argument("--loader", help="hh, shp, oasst1, ultrafeedback, local or synthetic")
    prepare.add_argument("--source", help="Hub id or local file/folder")
    prepare.add_argument("--out", required=True, help="output folder (written atomically)")
    prepare.add_argument("--split", action="append", metavar="OUT=UPSTREAM",
                         help="split to write, repeatable (default: the loader's)")
    prepare.add_argument("--max-examples", action="append", metavar="SPLIT=N")
    prepare.add_argument("--seed", type=int)
    prepare.add_argument("--on-error", choices=("raise", "skip"))
    prepare.add_argument("--option", action="append", metavar="KEY=VALUE",
                         help="loader option, repeatable (e.g. subsets=helpful)")
    prepare.set_defaults(func=_prepare)

    mix = commands.add_parser("mix", help="concatenate prepared datasets into one")
    mix.add_argument("parts", nargs="+", help="prepared dataset folders (data/NAME)")
    mix.add_argument("--out", required=True, help="output folder (written atomically)")
    mix.set_defaults(func=_mix)

    synth = commands.add_parser("synthetic", help="generate the embedded adder task")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synthetic)


def run(args: argparse.Namespace) -> int:
    """Run a parsed `data` command; bad input exits 2 with the located message."""
    try:
        check_output_folder(args.out)
        return args.func(args)
    except (DataError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halos")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
