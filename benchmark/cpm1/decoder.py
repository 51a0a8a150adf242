"""CPM-1 decode throughput: 255 greedy steps after a 256-token prompt, LM head included.

    python -m benchmark.cpm1.decoder --batch-size 1 32 --memory-limit 6GiB 3GiB --json cpm1_decoder.json

bminf resident (CUDA graphs) against HF fp16 eager; under --memory-limit, bminf's layer streaming
against accelerate's dispatch_model. Random weights of the real size. See benchmark/common.py.
"""
if not __package__:  # run as a file: the relative import below needs the package
    raise SystemExit("run it from the repository root as a module: python -m benchmark.cpm1.decoder ...")
from ..runs import decoder_main

if __name__ == "__main__":
    decoder_main("cpm1", __doc__)
