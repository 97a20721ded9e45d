# Stage 4: alignment per model x dataset x loss row: results/{suite}/{model}/{dataset}/{loss}/model/,
# policies and reward models (class rm: LM + value head, evaluated on preference pairs only;
# online PPO rows, rules/ppo.smk, train against it) alike. params.args holds every option and
# hyperparameter of the row, so editing a row reruns exactly its jobs (Snakemake's params rerun
# trigger). checkpoints/ is not an output: it survives an interrupted job and the rerun resumes
# from it.


rule align:
    input:
        unpack(run_inputs(hs.train_inputs)),
    output:
        directory(PATHS.model()),
    wildcard_constraints:
        loss=hs.wildcard_pattern(SUITE.align_losses()),
    log:
        PATHS.log("align", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("align", "{model}/{dataset}/{loss}", "benchmark.tsv")
    params:
        launch=launch,
        args=run_args(hs.align_args),
    threads: model_threads
    resources:
        **resources("train"),
    shell:
        "{params.launch} align {params.args} > {log} 2>&1"
