"""rayft: finetune open LLMs on a Ray cluster (Ray Data -> Ray Train + DeepSpeed), sweep them with Ray Tune
and serve them with Ray Serve. The code lives in rayft.training, rayft.tuning, rayft.serving and
rayft.cluster (the `rayft` command)."""

__version__ = "0.2.0"
