# Stage 6 (opt-in, suite `publish: {enabled: true, org: ORG}`): upload each run's model folder
# and its model card (with the eval results) to the Hugging Face Hub in one commit;
# published.json records the repo, commit and file hashes. Unchanged runs make no commit.


rule publish:
    input:
        model=PATHS.model(),
        evals=run_inputs(lambda s, m, d, l: hs.eval_files(s, hs.Run(m, d, l))),
    output:
        PATHS.published(),
    log:
        PATHS.log("publish", "{model}/{dataset}/{loss}"),
    params:
        args=run_args(hs.publish_args),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "halos publish {input.model} {params.args} --record {output} > {log} 2>&1"
