"""bminf: big pretrained Chinese language models on the GPU you have.

>>> import bminf
>>> cpm2 = bminf.models.CPM2()                                  # doctest: +SKIP
>>> cpm2.fill_blank("北京环球影城指定单日门票将采用<span>制度")   # doctest: +SKIP

Nothing heavy happens at import: torch, jieba and sentencepiece load when first used.
"""
import importlib

__version__ = "3.0.0.dev0"

# public name -> module that defines it; resolved on first access (PEP 562)
_LAZY = {
    "QuantizedLinear": "bminf.quantization",
    "TransformerBlockList": "bminf.offload",
    "wrapper": "bminf.wrapper",
}
_SUBMODULES = {"models", "tokenizers", "hub", "data", "quantization", "offload", "checkpoint", "kernels",
               "layers", "generation"}

__all__ = ["QuantizedLinear", "TransformerBlockList", "wrapper", "models", "tokenizers", "hub", "data",
           "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"bminf.{name}")
    else:
        raise AttributeError(f"module 'bminf' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
