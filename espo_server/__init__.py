"""espo-server: a vLLM rollout service for PPO that stops failing trajectories early (ESPO)."""

__version__ = "0.1.0"
