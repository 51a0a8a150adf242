"""Argument parsing shared by the public API and the CLI: memory sizes and dtypes, checked with errors
that name the argument.

>>> parse_size("6GiB"), parse_size("512MB"), parse_size(1 << 20)
(6442450944, 512000000, 1048576)
>>> parse_dtype("fp16")
torch.float16
"""
import re
from typing import Union

__all__ = ["parse_size", "parse_dtype", "DTYPE_NAMES"]

# decimal units as in "6GB", binary as in "6GiB" (accelerate and the HF hub read them the same way)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")

DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float32": "float32", "fp32": "float32", "float": "float32"}


def parse_size(value: Union[int, str], name: str = "memory_limit", *, allow_zero: bool = False) -> int:
    """Bytes from an int or a string such as ``"6GiB"``, ``"6GB"``, ``"512MiB"``, ``"1.5GiB"``.
    ``allow_zero``: accept 0 (a reserve may be empty; a limit may not).

    >>> parse_size("6 GiB") == 6 << 30
    True
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be a number of bytes or a string like '6GiB', got {type(value).__name__} "
                        f"{value!r}")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = match and _UNITS.get(match.group(2).lower())
        if not unit:
            raise ValueError(f"{name}={value!r} is not a size; use bytes or a number with one of "
                             "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
        value = int(float(match.group(1)) * unit)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")
    return value


def parse_dtype(value, name: str = "dtype"):
    """A floating ``torch.dtype`` from itself or a name: float16/fp16/half, bfloat16/bf16, float32/fp32/float.

    >>> parse_dtype("bf16")
    torch.bfloat16
    """
    import torch

    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"{name} must be a floating dtype, got {value}")
        return value
    if isinstance(value, str):
        key = DTYPE_NAMES.get(value.lower().replace("torch.", ""))
        if key is not None:
            return getattr(torch, key)
        raise ValueError(f"{name}={value!r} is not a dtype; use one of {', '.join(DTYPE_NAMES)} or a torch.dtype")
    raise TypeError(f"{name} must be a torch.dtype or its name, got {type(value).__name__} {value!r}")
