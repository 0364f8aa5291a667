"""Training: rewards (more to come: SFT and SRPO loops, losses, checkpoints)."""
from gream_fast.train.rewards import sid_reward

__all__ = ["sid_reward"]
