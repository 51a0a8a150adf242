"""bminf: big pretrained Chinese language models on the GPU you have.

>>> import bminf
>>> model = bminf.wrapper(model, memory_limit=6 << 30)          # doctest: +SKIP
>>> layer = bminf.QuantizedLinear.from_linear(torch.nn.Linear(8, 8))   # doctest: +SKIP

Nothing heavy happens at import: torch, jieba and sentencepiece load when first used.
"""
import importlib

__version__ = "3.0.0.dev0"

# public name -> module that defines it; resolved on first access (PEP 562)
_LAZY = {
    "QuantizedLinear": "bminf.quantization",
    "TransformerBlockList": "bminf.offload",
    "wrapper": "bminf.wrapping",
    "WrapperWarning": "bminf.wrapping",
}
_SUBMODULES = {"models", "tokenizers", "hub", "data", "quantization", "offload", "checkpoint", "kernels",
               "layers", "wrapping", "units", "cli"}

__all__ = ["QuantizedLinear", "TransformerBlockList", "wrapper", "WrapperWarning", "models", "tokenizers", "hub", "data",
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
    # the public names only: not importlib or the tables above
    return sorted(set(__all__) | set(_LAZY) | _SUBMODULES)
