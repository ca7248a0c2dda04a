"""MNIST for the trainer: the IDX files, fetching and checksums, tensors in memory and each rank's
batches; ``python -m trainer.data fetch|verify`` (``__main__.py``)."""
