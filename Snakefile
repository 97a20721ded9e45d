"""The suite DAG: models x losses x datasets, from data preparation to the leaderboard.

    snakemake --cores all                                   # the tiny suite, on this machine
    snakemake --profile slurm                               # on a Slurm cluster
    snakemake --cores all --config suite=configs/suites/archangel.yaml -n   # plan another suite

The suite file (default configs/suites/tiny.yaml) names the tables and picks their rows;
rules/common.smk loads and validates them through halos/suite/. Each stage is one file under
rules/, and every rule shells out to the `halos` CLI; its arguments come from
halos/suite/jobs.py, its resources from halos/suite/resources.py. Artifacts (each suite under
results/{suite}/): docs/architecture.md.
"""

from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/ref_logps.smk"
include: "rules/align.smk"
include: "rules/ppo.smk"
include: "rules/eval.smk"
include: "rules/publish.smk"
include: "rules/report.smk"


rule all:
    input:
        hs.final_outputs(SUITE),
    default_target: True
