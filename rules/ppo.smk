# Stage 4b: online PPO (RLHF) per model x dataset x online_ppo row: the policy starts from the
# row's start model (the SFT model), samples responses to the training prompts and is trained
# against the reward model of the row's `reward_model` row (rule align), with a value model
# initialised from it. Its model/ is evaluated like every other policy. checkpoints/ is not an
# output: an interrupted job resumes from it.


rule ppo:
    input:
        unpack(run_inputs(hs.ppo_inputs)),
    output:
        directory(PATHS.model()),
    wildcard_constraints:
        loss=hs.wildcard_pattern(SUITE.online_losses()),
    log:
        PATHS.log("ppo", "{model}/{dataset}/{loss}"),
    benchmark:
        PATHS.log("ppo", "{model}/{dataset}/{loss}", "benchmark.tsv")
    params:
        launch=launch,
        args=run_args(hs.ppo_args),
    threads: model_threads
    resources:
        **resources("train"),
    shell:
        "{params.launch} ppo {params.args} > {log} 2>&1"
