"""The model classes (``CPM1``, ``CPM2``, ``EVA``) and the backbones under them (``GPT``, ``T5``) with
their configs and presets.

>>> import bminf
>>> cpm2 = bminf.models.CPM2()                                   # doctest: +SKIP
"""
import importlib

_LAZY = {
    "CPM1": "bminf.models.cpm1", "CPM2": "bminf.models.cpm2", "EVA": "bminf.models.eva",
    "GPT": "bminf.models.gpt", "GPTConfig": "bminf.models.gpt", "GPT_PRESETS": "bminf.models.gpt",
    "T5": "bminf.models.t5", "T5Config": "bminf.models.t5", "T5_PRESETS": "bminf.models.t5",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'bminf.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(_LAZY)
