"""Field checks shared by the backbone configs, so that a bad config fails when it is made, not as
an empty model or an opaque shape error deep inside the first forward.

>>> check_config_fields(GPTConfig(), ints=("vocab_size", "n_layers"), floats=("eps",))  # doctest: +SKIP
"""
import math


def check_config_fields(config, ints=(), floats=()) -> None:
    """Every field named in ``ints`` must be an int >= 1, every one in ``floats`` a finite number > 0."""
    name = type(config).__name__
    for field in ints:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}.{field} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name}.{field} must be >= 1, got {value}")
    for field in floats:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}.{field} must be a number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}.{field} must be a finite number > 0, got {value}")
