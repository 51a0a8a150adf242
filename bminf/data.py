"""BMInf 1.x ``bminf.data`` API, kept for existing scripts; new code uses :mod:`bminf.hub`.

>>> import bminf.data
>>> bminf.data.set_source("http://mirror.example.com/bminf")   # a trailing "/" is added
>>> bminf.data.get_source()
'http://mirror.example.com/bminf/'
>>> bminf.data.set_source(None)                                 # back to BMINF_SOURCE / the default

Unlike 1.x, downloads are verified and resumable, and a verified cached file is used without
contacting the server (see ``bminf.hub``). Failing to download raises ``bminf.hub.NotCachedError``,
a ``ConnectionError`` as in 1.x.
"""
from bminf.hub import get_cache_path, get_source, set_cache_path, set_source
from bminf.hub import ensure_file as _ensure_file

__all__ = ["set_source", "get_source", "set_cache_path", "get_cache_path", "ensure_file"]


def ensure_file(model_name: str, filename: str) -> str:
    """Local path of ``filename`` of version ``model_name`` (or ``file://DIR``), downloading it if needed.

    >>> ensure_file("cpm1-new", "vocab.txt")       # doctest: +SKIP
    '/root/.cache/bigmodels/cpm1-new/vocab.txt'
    """
    return _ensure_file(model_name, filename)
