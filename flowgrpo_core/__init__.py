"""flowgrpo_core: the Flow-GRPO engine (math, models, sampling, training, rewards, tracking)."""

__version__ = "0.1.0"
