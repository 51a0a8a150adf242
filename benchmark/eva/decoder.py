"""EVA decode throughput: 255 greedy steps against a 256-token encoder output, LM head included.

    python -m benchmark.eva.decoder --batch-size 1 32 --memory-limit 6GiB 3GiB --json eva_decoder.json

bminf resident (CUDA graphs) against HF fp16 eager; under --memory-limit, bminf's layer streaming
against accelerate's dispatch_model. Random weights of the real size. See benchmark/common.py.
"""
if not __package__:  # run as a file: the relative import below needs the package
    raise SystemExit("run it from the repository root as a module: python -m benchmark.eva.decoder ...")
from ..runs import decoder_main

if __name__ == "__main__":
    decoder_main("eva", __doc__)
