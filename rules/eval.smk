# Stage 5: evaluation of every run into results/{model}/{dataset}/{loss}/eval/. The suite's
# `eval:` section picks what runs (judge, sampling, lm-eval tasks); hs.eval_files lists it.


rule sample:
    input:
        model="results/{model}/{dataset}/{loss}/model",
        data="data/{dataset}",
    output:
        "results/{model}/{dataset}/{loss}/eval/samples.jsonl",
    log:
        "logs/sample/{model}/{dataset}/{loss}.log",
    benchmark:
        "logs/sample/{model}/{dataset}/{loss}.benchmark.tsv"
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
        unpack(
            lambda wc: {
                "model": f"results/{wc.model}/{wc.dataset}/{wc.loss}/model",
                "data": hs.data_dir(wc.dataset),
                "ref": hs.preference_ref(SUITE, wc.model, wc.dataset, wc.loss) or [],
            }
        ),
    output:
        "results/{model}/{dataset}/{loss}/eval/preference.json",
    log:
        "logs/eval_preference/{model}/{dataset}/{loss}.log",
    benchmark:
        "logs/eval_preference/{model}/{dataset}/{loss}.benchmark.tsv"
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
        samples="results/{model}/{dataset}/{loss}/eval/samples.jsonl",
        baseline="results/{model}/{dataset}/sft/eval/samples.jsonl",
    output:
        "results/{model}/{dataset}/{loss}/eval/judge.json",
    log:
        "logs/eval_judge/{model}/{dataset}/{loss}.log",
    benchmark:
        "logs/eval_judge/{model}/{dataset}/{loss}.benchmark.tsv"
    params:
        args=run_args(hs.judge_args),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "env OMP_NUM_THREADS=1 halos eval judge {params.args} > {log} 2>&1"


rule eval_lm:
    input:
        model="results/{model}/{dataset}/{loss}/model",
    output:
        "results/{model}/{dataset}/{loss}/eval/lm_eval.json",
    log:
        "logs/eval_lm/{model}/{dataset}/{loss}.log",
    benchmark:
        "logs/eval_lm/{model}/{dataset}/{loss}.benchmark.tsv"
    params:
        launch=launch,
        args=run_args(hs.lm_eval_args),
    threads: model_threads
    resources:
        **resources("infer"),
    shell:
        "{params.launch} eval lm-eval {params.args} > {log} 2>&1"
