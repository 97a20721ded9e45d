"""Models: the built-in tiny Llamas (tiny.py), LM + value head (value_head.py), generation shared
by sampling and online PPO (generation.py). This file imports no torch: its constants are read by
torch-free code (the Hub upload, the leaderboard)."""

VALUE_HEAD_FILE = "value_head.safetensors"  # a reward/value model's head, beside its HF folder
