# Stage 4: alignment per model x dataset x loss row: results/{model}/{dataset}/{loss}/model/.
# params.args holds every option and hyperparameter of the row, so editing a row reruns exactly
# its jobs (Snakemake's params rerun trigger). checkpoints/ is not an output: it survives an
# interrupted job and the rerun resumes from it.


rule align:
    input:
        unpack(run_inputs(hs.train_inputs)),
    output:
        directory("results/{model}/{dataset}/{loss}/model"),
    wildcard_constraints:
        loss=hs.wildcard_pattern(SUITE.align_losses()),
    log:
        "logs/align/{model}/{dataset}/{loss}.log",
    benchmark:
        "logs/align/{model}/{dataset}/{loss}.benchmark.tsv"
    params:
        launch=launch,
        args=run_args(hs.align_args),
    threads: model_threads
    resources:
        **resources("train"),
    shell:
        "{params.launch} align {params.args} > {log} 2>&1"


# A reward model (class rm: LM + value head), per model x dataset x rm row. It is not a policy:
# it is evaluated on preference pairs only; online PPO rows (rules/ppo.smk) train against it.
rule reward_model:
    input:
        unpack(run_inputs(hs.train_inputs)),
    output:
        directory("results/{model}/{dataset}/{loss}/model"),
    wildcard_constraints:
        loss=hs.wildcard_pattern(SUITE.reward_losses()),
    log:
        "logs/reward_model/{model}/{dataset}/{loss}.log",
    benchmark:
        "logs/reward_model/{model}/{dataset}/{loss}.benchmark.tsv"
    params:
        launch=launch,
        args=run_args(hs.align_args),
    threads: model_threads
    resources:
        **resources("train"),
    shell:
        "{params.launch} align {params.args} > {log} 2>&1"
