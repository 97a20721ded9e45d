# Stage 7: the leaderboard, one row per model x dataset x loss, from every run's eval files.


rule report:
    input:
        hs.report_inputs(SUITE),
    output:
        md=report("results/leaderboard.md", category="Leaderboard"),
        csv=report("results/leaderboard.csv", category="Leaderboard"),
        plots=report(directory("results/plots"), patterns=["{name}.png"], category="Plots"),
    log:
        "logs/report.log",
    benchmark:
        "logs/report.benchmark.tsv"
    threads: 1
    resources:
        **resources("cpu"),
    shell:
        "env OMP_NUM_THREADS=1 halos report --results results --out {output.md} --plots {output.plots}"
        " > {log} 2>&1"
