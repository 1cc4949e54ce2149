"""RLHF: SFT, reward modelling, PPO and DPO (math helpers in :mod:`nanogpt4.rlhf.ops`)."""

from nanogpt4.rlhf.models import RewardModel
from nanogpt4.rlhf.ppo import PPOTrainer

__all__ = ["PPOTrainer", "RewardModel"]
