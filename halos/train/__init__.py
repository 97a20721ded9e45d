"""Training: `halos sft` / `halos align` (run.py) on the one loop (loop.py), with DeepSpeed
(engine.py, distributed.py, checkpoints.py), batches (batching.py, dataview.py), log-probs at
scored positions only (logps.py) and the precomputed reference (reference.py, reference_pass.py)."""
