# Stage 7: the suite's leaderboard, one row per model x dataset x loss of this suite, from
# exactly its runs' eval files (results/{suite}/leaderboard.{md,csv}, results/{suite}/plots/).
# The plan (results/{suite}/plan.{md,csv}, `halos plan`) is rewritten first, so the leaderboard's
# cost section sets each run's measured cost (its jobs' benchmark TSVs) beside the plan's.

# The report's landing page: the leaderboard and plots (`snakemake --report report.html`).
report: "report.rst"


rule report:
    input:
        hs.report_inputs(SUITE),
    output:
        md=report(PATHS.leaderboard("md"), category="Leaderboard"),
        csv=report(PATHS.leaderboard("csv"), category="Leaderboard"),
        rst=PATHS.leaderboard("rst"),  # leaderboard.md as RST: the HTML report's page
        plots=report(directory(PATHS.plots), patterns=["{name}.png"], category="Plots"),
        plan=report(PATHS.plan("md"), category="Plan"),
    log:
        PATHS.log("report", SUITE.name),
    benchmark:
        PATHS.log("report", SUITE.name, "benchmark.tsv")
    params:
        args=hs.report_args(SUITE),
        suite=SUITE.path,
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "(env OMP_NUM_THREADS=1 halos plan {params.suite:q} --out {output.plan}"
        " && env OMP_NUM_THREADS=1 halos report {params.args}) > {log} 2>&1"
