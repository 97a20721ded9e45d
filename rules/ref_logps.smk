# Stage 3: reference log-probs, once per model x dataset, shared by every reference-based loss:
# of the SFT model (ref_logps.pt, for from_sft rows) or of the base model (ref_logps_base.pt).


rule ref_logps:
    input:
        model=PATHS.model(loss=hs.SFT),
        data=hs.data_dir(),
    output:
        PATHS.reference(base=False),
    log:
        PATHS.log("ref_logps", "{model}/{dataset}"),
    benchmark:
        PATHS.log("ref_logps", "{model}/{dataset}", "benchmark.tsv")
    params:
        launch=launch,
        args=lambda wc: hs.ref_args(SUITE, wc.model, wc.dataset, base=False),
    threads: model_threads
    resources:
        **resources("infer"),
    shell:
        "{params.launch} ref-logps {params.args} > {log} 2>&1"


rule ref_logps_base:
    input:
        unpack(lambda wc: {"data": hs.data_dir(wc.dataset), "model": hs.local_model_inputs(SUITE, wc.model)}),
    output:
        PATHS.reference(base=True),
    log:
        PATHS.log("ref_logps_base", "{model}/{dataset}"),
    benchmark:
        PATHS.log("ref_logps_base", "{model}/{dataset}", "benchmark.tsv")
    params:
        launch=launch,
        args=lambda wc: hs.ref_args(SUITE, wc.model, wc.dataset, base=True),
    threads: model_threads
    resources:
        **resources("infer"),
    shell:
        "{params.launch} ref-logps {params.args} > {log} 2>&1"
