"""Evaluation: sampling, judged win-rates, preference metrics, lm-eval, and the leaderboard.

    halos sample     completions for held-out prompts (greedy or seeded temperature sampling)
    halos eval preference | judge | lm-eval
    halos report     results/{suite}/leaderboard.{md,csv} and results/{suite}/plots/*.png

Modules import torch/transformers/lm_eval lazily, so `halos report` and the statistics stay
cheap to import.
"""
