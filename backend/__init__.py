"""label-studio-hcc engine: verify cheap LLM pre-labels by heterogeneous consistency.

The engine (this package, minus the Label Studio layer) takes plain arrays and records and knows
nothing of Label Studio.
"""

__version__ = "0.1.0"
