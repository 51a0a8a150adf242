"""CPM-2 encoder throughput: 24 int8 encoder blocks + final norm over 256 tokens, against HF fp16 eager.

    python -m benchmark.cpm2.encoder --batch-size 1 8 --json cpm2_encoder.json

"bminf" is the encoder as the generation loop runs it (replayed from a CUDA graph, GraphedDecoder.encode),
"bminf_eager" the same modules launched from Python. Random weights of the real size (no checkpoint).
See benchmark/common.py for what is timed.
"""
if not __package__:  # run as a file: the relative import below needs the package
    raise SystemExit("run it from the repository root as a module: python -m benchmark.cpm2.encoder ...")
from ..runs import encoder_main

if __name__ == "__main__":
    encoder_main("cpm2", __doc__)
