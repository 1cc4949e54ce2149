"""RLHF: SFT, reward modelling, PPO and DPO (math helpers in :mod:`nanogpt4.rlhf.ops`)."""
