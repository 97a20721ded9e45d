# Stage 1: data/{dataset}/ (normalized JSONL) and the base models the DAG builds, models/{model}/:
# built-in tiny ones and GGUF rows imported once into a Hugging Face folder.
# Both depend on their table row only, so every suite shares them.


rule prepare_data:
    output:
        directory(hs.data_dir()),
    wildcard_constraints:
        dataset=hs.wildcard_pattern([d for d, r in SUITE.datasets.items() if "mix" not in r]),
    log:
        PATHS.log("prepare_data", "{dataset}"),
    benchmark:
        PATHS.log("prepare_data", "{dataset}", "benchmark.tsv")
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
        directory(hs.data_dir()),
    wildcard_constraints:
        dataset=hs.wildcard_pattern([d for d, r in SUITE.datasets.items() if "mix" in r]),
    log:
        PATHS.log("mix_data", "{dataset}"),
    params:
        args=lambda wc: hs.mix_args(SUITE, wc.dataset),
    threads: 1
    shell:
        "halos data mix {params.args} > {log} 2>&1"


rule tiny_model:
    input:
        lambda wc: hs.data_dir(SUITE.models[wc.model]["tiny_corpus"]),
    output:
        directory(hs.base_model_dir()),
    wildcard_constraints:
        model=hs.wildcard_pattern([m for m in SUITE.models if SUITE.is_builtin(m)]),
    log:
        PATHS.log("tiny_model", "{model}"),
    benchmark:
        PATHS.log("tiny_model", "{model}", "benchmark.tsv")
    params:
        args=lambda wc: hs.tiny_model_args(SUITE, wc.model),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "env OMP_NUM_THREADS={threads} halos tiny-model {params.args} > {log} 2>&1"


rule import_model:
    output:
        directory(hs.base_model_dir()),
    wildcard_constraints:
        model=hs.wildcard_pattern([m for m in SUITE.models if SUITE.is_imported(m)]),
    log:
        PATHS.log("import_model", "{model}"),
    benchmark:
        PATHS.log("import_model", "{model}", "benchmark.tsv")
    params:
        args=lambda wc: hs.import_model_args(SUITE, wc.model),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "env OMP_NUM_THREADS={threads} halos import-model {params.args} > {log} 2>&1"
