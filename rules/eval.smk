# Stage 5: evaluation of every run into results/{suite}/{model}/{dataset}/{loss}/eval/. The
# suite's `eval:` section picks what runs (judge, sampling, lm-eval tasks); hs.eval_files lists it.


rule sample:
    input:
        model=PATHS.model(),
        data=hs.data_dir(),
    output:
        PATHS.eval_file("samples.jsonl"),
    log:
        PATHS.log("sample", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("sample", "{model}/{dataset}/{loss}", "benchmark.tsv")
    params:
        launch=launch,
        args=run_args(hs.sample_args),
    threads: model_threads
    resources:
        **resources("infer"),
    shell:
        "{params.launch} sample {params.args} > {log} 2>&1"


rule eval_preference:
    input:
        unpack(run_inputs(hs.preference_inputs)),
    output:
        PATHS.eval_file("preference.json"),
    log:
        PATHS.log("eval_preference", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("eval_preference", "{model}/{dataset}/{loss}", "benchmark.tsv")
    params:
        launch=launch,
        args=run_args(hs.preference_args),
    threads: model_threads
    resources:
        **resources("infer"),
    shell:
        "{params.launch} eval preference {params.args} > {log} 2>&1"


# The judge compares a run's samples with the SFT model's (the baseline) on the same prompts.
rule eval_judge:
    input:
        samples=PATHS.eval_file("samples.jsonl"),
        baseline=PATHS.eval_file("samples.jsonl", loss=hs.SFT),
    output:
        PATHS.eval_file("judge.json"),
    log:
        PATHS.log("eval_judge", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("eval_judge", "{model}/{dataset}/{loss}", "benchmark.tsv")
    params:
        args=run_args(hs.judge_args),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "env OMP_NUM_THREADS=1 halos eval judge {params.args} > {log} 2>&1"


rule eval_lm:
    input:
        model=PATHS.model(),
    output:
        PATHS.eval_file("lm_eval.json"),
    log:
        PATHS.log("eval_lm", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("eval_lm", "{model}/{dataset}/{loss}", "benchmark.tsv")
    params:
        launch=launch,
        args=run_args(hs.lm_eval_args),
    threads: model_threads
    resources:
        **resources("infer"),
    shell:
        "{params.launch} eval lm-eval {params.args} > {log} 2>&1"
