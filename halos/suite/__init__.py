"""The suite: config tables → the jobs of the Snakemake DAG. Imports no torch (Snakemake loads
it to plan), so planning a 398-job suite takes seconds.

    tables.py     load and validate the suite file and its three tables; Suite, Run
    paths.py      the artifact layout (data/, models/, results/{suite}/..., logs/{suite}/...)
    jobs.py       each job's inputs and `halos` arguments
    resources.py  each job's memory, time, nodes, GPUs, CPUs
    launch.py     how a job runs `halos`: one process, torchrun, srun + torchrun

`rules/common.smk` imports this package as `hs`.
"""

import re

from halos.suite.jobs import (  # noqa: F401
    align_args,
    base_model,
    batch_options,
    cli_args,
    data_options,
    eval_files,
    eval_job,
    evaluate_args,
    evaluate_files,
    evaluate_inputs,
    evaluate_outputs,
    evaluated_losses,
    final_outputs,
    import_model_args,
    judge_args,
    lm_eval_args,
    local_model_inputs,
    mix_args,
    mix_parts,
    ppo_args,
    ppo_inputs,
    preference_args,
    preference_inputs,
    preference_ref,
    prepare_args,
    publish_args,
    ref_args,
    reference_file,
    report_args,
    report_inputs,
    reward_model_dir,
    sample_args,
    sft_args,
    start_model,
    system_options,
    tiny_model_args,
    train_inputs,
    train_options,
)
from halos.suite.launch import add_to_path, launch_command, launcher, rendezvous_port  # noqa: F401
from halos.suite.paths import SFT, Layout, base_model_dir, data_dir  # noqa: F401
from halos.suite.resources import RESOURCE_KEYS, processes, resources, threads, world_size  # noqa: F401
from halos.suite.tables import (  # noqa: F401
    DEFAULT_SUITE,
    ONLINE_PPO_CLASS,
    REWARD_MODEL_CLASS,
    Run,
    Suite,
    SuiteError,
    load_suite,
    load_table,
    loss_registry,
)


def wildcard_pattern(names: list[str] | dict) -> str:
    """A regex matching exactly these row names (longest first, so `sft+dpo` wins over `sft`)."""
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"
