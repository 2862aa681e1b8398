"""dsparse: train PyTorch models across heterogeneous edge boards."""

__version__ = "0.1.0"
