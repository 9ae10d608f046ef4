"""How rayft reaches Ray: a local cluster on this machine, or a running cluster by address. The rule itself lives in
rayft.training.resources, so that the training job's own entrypoint (rayft.training.run) starts or joins Ray the way
every command does."""

from rayft.training.resources import connect

__all__ = ["connect"]
