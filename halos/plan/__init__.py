"""What a suite costs before it runs (`halos plan SUITE_FILE`), and what each run really cost.

    hardware.py  peak FLOP/s and memory of a GPU type, the assumed MFU (stated, overridable)
    arch.py      a model row's parameter count (`params` column) and shape (its config.json)
    tokens.py    tokens of each job: counted from the prepared data with the job's tokenizer and
                 step plan exactly as training does, else estimated from the datasets table
    flops.py     FLOPs of a job: 6N per trained token, 2N per scored or generated token
    memory.py    peak memory per GPU: DeepSpeed's own model-state estimators + activations +
                 the chunked LM head; a row that does not fit gets the change that fits
    jobs.py      one plan row per job of the suite (`halos.suite.jobs` decides the jobs)
    render.py    the plan as markdown and CSV, totals per model and per suite
    measured.py  a run's measured cost: Snakemake benchmark TSVs + the trainer's peak memory
    peak.py      the trainer's peak memory (max RSS, peak GPU memory), for halos_training.json

Everything here imports no torch at module level: Snakemake fills a models row's missing
`runtime` / `mem_mb` from the plan (halos/suite/resources.py). Only the exact token count
(transformers, the trainer's data code) and DeepSpeed's estimators import torch, lazily.
"""
