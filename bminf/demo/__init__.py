"""Small demo checkpoints in BMInf's released layout, shipped with the package.

The released CPM-1/CPM-2/EVA weights (2.6B-11B) cannot be fetched everywhere, so each model has a
demo version: ``checkpoint.pt`` (BMInf's binary format, int8 linears) and a real Chinese
``vocab.txt``, a few MB in all, trained on MIT-licensed text (see README.md next to this file;
``scripts/make_demo.py`` and ``scripts/train_demo.py`` rebuild them).

>>> from bminf.demo import DEMO_VERSIONS, path
>>> DEMO_VERSIONS["cpm2"]
'cpm2-demo'
>>> os.path.basename(path("cpm2-demo"))
'cpm2-demo'
"""
import os

__all__ = ["DEMO_VERSIONS", "path"]

# model name -> the demo version used when the real checkpoint is absent
DEMO_VERSIONS = {"cpm1": "cpm1-demo", "cpm2": "cpm2-demo", "eva": "eva-demo"}

_HERE = os.path.dirname(os.path.abspath(__file__))


def path(version: str) -> str:
    """Directory holding ``checkpoint.pt`` and ``vocab.txt`` of a demo version.

    >>> path("eva-demo").endswith(os.path.join("demo", "eva-demo"))
    True
    """
    if version not in DEMO_VERSIONS.values():
        known = ", ".join(sorted(DEMO_VERSIONS.values()))
        raise ValueError(f"version must be one of the demo versions ({known}), got {version!r}")
    return os.path.join(_HERE, version)
