# Stage 1: data/{dataset}/ (normalized JSONL) and the built-in tiny base models, models/{model}/.


rule prepare_data:
    output:
        directory("data/{dataset}"),
    wildcard_constraints:
        dataset=hs.wildcard_pattern([d for d, r in SUITE.datasets.items() if "mix" not in r]),
    log:
        "logs/prepare_data/{dataset}.log",
    benchmark:
        "logs/prepare_data/{dataset}.benchmark.tsv"
    params:
        args=lambda wc: hs.prepare_args(SUITE, wc.dataset),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "halos data prepare {params.args} > {log} 2>&1"


rule mix_data:
    input:
        lambda wc: hs.mix_parts(SUITE, wc.dataset),
    output:
        directory("data/{dataset}"),
    wildcard_constraints:
        dataset=hs.wildcard_pattern([d for d, r in SUITE.datasets.items() if "mix" in r]),
    log:
        "logs/mix_data/{dataset}.log",
    threads: 1
    run:
        hs.mix_datasets(input, output[0])


rule tiny_model:
    input:
        lambda wc: hs.data_dir(SUITE.models[wc.model]["tiny_corpus"]),
    output:
        directory("models/{model}"),
    wildcard_constraints:
        model=hs.wildcard_pattern([m for m in SUITE.models if SUITE.is_builtin(m)]),
    log:
        "logs/tiny_model/{model}.log",
    benchmark:
        "logs/tiny_model/{model}.benchmark.tsv"
    params:
        args=lambda wc: hs.tiny_model_args(SUITE, wc.model),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "env OMP_NUM_THREADS={threads} halos tiny-model {params.args} > {log} 2>&1"
