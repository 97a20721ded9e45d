# Stage 5: evaluation of every run into results/{suite}/{model}/{dataset}/{loss}/eval/. The
# suite's `eval:` section picks what runs (judge, sampling, lm-eval tasks); hs.eval_files lists it.


# A generating run's model-based evals (preference pairs, samples for the judge, lm-eval) are
# one job, one process: on a cluster one queue wait and one model load instead of three.
rule evaluate:
    input:
        unpack(run_inputs(hs.evaluate_inputs)),
    output:
        hs.evaluate_outputs(SUITE),
    log:
        PATHS.log("evaluate", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("evaluate", "{model}/{dataset}/{loss}", "benchmark.tsv")
    wildcard_constraints:
        loss=hs.wildcard_pattern(hs.evaluated_losses(SUITE, reward_models=False)),
    params:
        launch=launch,
        args=run_args(hs.evaluate_args),
    threads: model_threads
    resources:
        **resources("infer"),
    shell:
        "{params.launch} {params.args} > {log} 2>&1"


# A reward model is scored on the held-out pairs only.
rule eval_preference:
    input:
        unpack(run_inputs(hs.preference_inputs)),
    output:
        PATHS.eval_file("preference.json"),
    log:
        PATHS.log("eval_preference", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("eval_preference", "{model}/{dataset}/{loss}", "benchmark.tsv")
    wildcard_constraints:
        loss=hs.wildcard_pattern(hs.evaluated_losses(SUITE, reward_models=True)),
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
