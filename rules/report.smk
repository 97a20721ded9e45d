# Stage 7: the suite's leaderboard, one row per model x dataset x loss of this suite, from
# exactly its runs' eval files (results/{suite}/leaderboard.{md,csv}, results/{suite}/plots/).


rule report:
    input:
        hs.report_inputs(SUITE),
    output:
        md=report(PATHS.leaderboard("md"), category="Leaderboard"),
        csv=report(PATHS.leaderboard("csv"), category="Leaderboard"),
        plots=report(directory(PATHS.plots), patterns=["{name}.png"], category="Plots"),
    log:
        PATHS.log("report", SUITE.name),
    benchmark:
        PATHS.log("report", SUITE.name, "benchmark.tsv")
    params:
        args=hs.report_args(SUITE),
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "env OMP_NUM_THREADS=1 halos report {params.args} > {log} 2>&1"
