"""Memory sizes and dtypes as the public API and the CLI accept them."""
import pytest
import torch

from bminf.units import parse_dtype, parse_size


@pytest.mark.parametrize("text, expected", [("6GiB", 6 << 30), ("6GB", 6 * 10**9), ("512MiB", 512 << 20),
                                            ("1.5GiB", 3 << 29), (" 6 gib ", 6 << 30), ("4096", 4096), (7, 7)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad, error", [("6 gigs", ValueError), ("", ValueError), ("-1GiB", ValueError),
                                        (0, ValueError), (-5, ValueError), (True, TypeError), (6.5, TypeError),
                                        (None, TypeError)])
def test_bad_sizes_name_the_argument(bad, error):
    with pytest.raises(error, match="memory_limit"):
        parse_size(bad)


def test_dtypes():
    assert parse_dtype("float16") is torch.float16 and parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype("torch.float32") is torch.float32 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype='int9'"):
        parse_dtype("int9")
    with pytest.raises(ValueError, match="floating"):
        parse_dtype(torch.int8)
    with pytest.raises(TypeError, match="dtype"):
        parse_dtype(16)
