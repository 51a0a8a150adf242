"""Generation: the decode loop and what it uses (``graphs``: CUDA-graph decode steps)."""
