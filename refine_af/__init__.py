"""refine-af: instruction-tuning data from small open LLMs, improved by RL from feedback."""

__version__ = "0.1.0"
