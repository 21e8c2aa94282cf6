"""raymerge: merge model checkpoints without training, across a Ray cluster."""

__version__ = "0.1.0"
