# Load the suite once; everything else lives in halos/suite/ (unit-tested without Snakemake).
import os
import sys

import halos.suite as hs

# Jobs run `halos` and `torchrun` from the environment that runs Snakemake, also when it is not
# activated (`.venv/bin/snakemake`); appended, so an explicit PATH entry still comes first.
hs.add_to_path(os.path.dirname(sys.executable))
SUITE = hs.load_suite(config.get("suite") or hs.DEFAULT_SUITE)
PATHS = SUITE.layout  # results/{suite}/..., logs/{suite}/... (halos/suite/paths.py)
for _loss, _why in SUITE.pending.items():
    print(f"[suite {SUITE.name}] loss row {_loss!r} left out: {_why}", file=sys.stderr)


wildcard_constraints:
    model=hs.wildcard_pattern(SUITE.models),
    dataset=hs.wildcard_pattern(SUITE.datasets),
    loss=hs.wildcard_pattern(SUITE.losses),


localrules:
    all,
    mix_data,
    eval_judge,
    report,


def resources(stage):
    """`resources: **resources("train")`: each value read from the model's row per job."""
    if stage == "cpu":
        return hs.resources(None, None, "cpu")
    return {
        k: (lambda wc, k=k: hs.resources(SUITE, wc.model, stage)[k]) for k in hs.RESOURCE_KEYS
    }


def model_threads(wildcards):
    return hs.threads(SUITE, wildcards.model)


def launch(wildcards, output, threads, resources):
    """hs.launcher: training and ref-logps join a process group (several processes per node
    when the model row asks) over the job's nodes; sampling and evals (outputs under eval/)
    run one process."""
    distributed = not any("/eval/" in str(f) for f in output)
    return hs.launcher(SUITE, wildcards.model, threads, distributed=distributed,
                       nodes=resources.nodes)


def run_args(function):
    """params: args=run_args(hs.align_args) -> function(SUITE, model, dataset, loss)."""
    return lambda wc: function(SUITE, wc.model, wc.dataset, wc.loss)


def run_inputs(function):
    return lambda wc: function(SUITE, wc.model, wc.dataset, wc.loss)
