"""raymerge: merge model checkpoints without training, across a Ray cluster."""

__version__ = "0.1.0"


def open(uri: str):  # noqa: A001 - raymerge.open(uri), as in the docs
    """A merge output (folder or s3://bucket/prefix) as a mapping of tensor name -> tensor,
    each read with one ranged request when asked for."""
    from raymerge.reader import MergedModel

    return MergedModel(uri)
