"""CPM-1 encoder throughput: 32 int8 blocks + final norm (the prompt pass) over 256 tokens, against HF GPT-2 fp16 eager.

    python -m benchmark.cpm1.encoder --batch-size 1 8 --json cpm1_encoder.json

Random weights of the real size (no checkpoint). See benchmark/common.py for what is timed.
"""
if not __package__:  # run as a file: the relative import below needs the package
    raise SystemExit("run it from the repository root as a module: python -m benchmark.cpm1.encoder ...")
from ..runs import encoder_main

if __name__ == "__main__":
    encoder_main("cpm1", __doc__)
