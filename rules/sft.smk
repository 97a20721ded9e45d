# Stage 2: SFT per model x dataset (the losses-table row "sft"): results/{suite}/{model}/{dataset}/sft/.
# Only model/ is the output: checkpoints/ beside it survives an interrupted job, and the rerun
# resumes from it (`halos sft` resumes by itself).


rule sft:
    input:
        unpack(lambda wc: hs.train_inputs(SUITE, wc.model, wc.dataset, hs.SFT)),
    output:
        directory(PATHS.model(loss=hs.SFT)),
    log:
        PATHS.log("sft", "{model}/{dataset}"),
    benchmark:
        PATHS.log("sft", "{model}/{dataset}", "benchmark.tsv")
    params:
        launch=launch,
        args=lambda wc: hs.sft_args(SUITE, wc.model, wc.dataset),
    threads: model_threads
    resources:
        **resources("train"),
    shell:
        "{params.launch} sft {params.args} > {log} 2>&1"
