"""Single-GPU RLHF (SFT -> reward model -> PPO) with QLoRA on TRL."""

__version__ = "0.1.0"
