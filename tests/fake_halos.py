#!/usr/bin/env python
"""A stand-in for the `halos` CLI in DAG tests: writes each command's outputs in milliseconds and
appends the command line to $FAKE_HALOS_LOG, so the tests check the DAG (what runs, what reruns)
without training anything."""

import json
import os
import sys
import time
from pathlib import Path


def option(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def main(argv):
    """One command per line of the log; `A --then B` (one job, several commands) as A and B."""
    command = []
    for arg in [*argv, "--then"]:
        if arg == "--then":
            run(command)
            command = []
        else:
            command.append(arg)
    return 0


def run(argv):
    with open(os.environ["FAKE_HALOS_LOG"], "a") as log:
        log.write(" ".join(argv) + "\n")
    hang = os.environ.get("FAKE_HALOS_HANG")
    if hang and hang in " ".join(argv):
        time.sleep(600)  # a job to kill midway
    out = Path(option(argv, "--out"))
    command = argv[0] if argv[0] not in ("data", "eval") else " ".join(argv[:2])
    if command in ("sft", "align", "ppo"):
        (out / "model").mkdir(parents=True)
        (out / "model" / "config.json").write_text(json.dumps({"args": argv}))
    elif command in ("tiny-model", "data prepare", "data mix"):
        out.mkdir(parents=True)
        for name in ("train.jsonl", "test.jsonl", "sft.jsonl", "prompts.jsonl"):
            (out / name).write_text("{}\n")
    elif command == "report":
        out.write_text("| model | dataset | loss |\n")
        out.with_suffix(".csv").write_text("model,dataset,loss\n")
        out.with_suffix(".rst").write_text("Leaderboard\n-----------\n")
        (out.parent / "plots").mkdir(exist_ok=True)
        (out.parent / "plots" / "scores.png").write_bytes(b"\x89PNG")
    else:  # ref-logps, sample, eval *
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": argv}))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
