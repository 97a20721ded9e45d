"""Reinforcement learning: online PPO (`halos ppo`, online_ppo.py) and the PPO maths
(ppo_math.py) it shares with Archangel's offline `ppo` loss (halos/losses/offline_ppo.py)."""
