# Stage 6 (opt-in, suite `publish: {enabled: true, repo_prefix: org/name}`): upload each run's
# model folder to the Hugging Face Hub; published.json records where it went.


rule publish:
    input:
        model="results/{model}/{dataset}/{loss}/model",
        evals=run_inputs(lambda s, m, d, l: hs.eval_files(s, hs.Run(m, d, l))),
    output:
        "results/{model}/{dataset}/{loss}/published.json",
    log:
        "logs/publish/{model}/{dataset}/{loss}.log",
    params:
        repo=run_args(lambda s, m, d, l: hs.hub_repo(s, hs.Run(m, d, l))),
        private="--private" if SUITE.publish.get("private", True) else "--no-private",
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "hf upload {params.repo} {input.model} . {params.private} > {log} 2>&1"
        " && printf '{{\"repo\": \"%s\"}}\\n' {params.repo} > {output}"
