"""refine-af: instruction-tuning data from small open LLMs, improved by RL from feedback."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin while they wait for each other. When anything else runs on
# the cores (a sibling step, a laptop's other work, a pod sharing a node), a descheduled
# thread keeps its spinning siblings at a barrier for whole time slices, hundreds of times
# per generated token: at load 10 on 2 cores, decoding ran 13-40x slower than with
# passive waits (see refine_af/threads.py). libgomp reads this once, when torch loads, so it
# is set before anything imports torch; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
