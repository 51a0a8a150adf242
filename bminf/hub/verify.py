"""Check a downloaded ``checkpoint.pt`` before it gets its final name.

A mirror without ``.sha256`` files leaves nothing but the size to check, so a checkpoint must also
parse as BMInf's layer tree, and for a released version hold the tensors that release holds: the
right number of blocks of the right size in each block list, and the right total. The numbers are
those of the released files (the original's scheduler sizes, which the tests check against our presets).

>>> check_checkpoint("/tmp/cache/cpm1-new/checkpoint.pt.part", "cpm1-new")   # doctest: +SKIP
"""
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

__all__ = ["Release", "RELEASES", "check_checkpoint", "checker"]


@dataclass(frozen=True)
class Release:
    total: int                          # bytes of tensor data in the file
    blocks: Dict[str, Tuple[int, int]]  # block list -> (number of blocks, bytes of each)


RELEASES: Dict[str, Release] = {
    "cpm1-new": Release(2_679_040_000, {"layers": (32, 78_755_840)}),
    "cpm2.1-new": Release(11_307_278_336, {"enc_layers": (24, 193_036_288), "dec_layers": (24, 260_186_112)}),
    "eva-int8-new": Release(2_966_532_096, {"enc_layers": (24, 48_283_648), "dec_layers": (24, 65_081_344)}),
}


def check_checkpoint(path: str, version: str) -> None:
    """Raise ``ValueError`` saying what is wrong unless ``path`` is a checkpoint of ``version``."""
    from bminf.checkpoint.bminf_format import read_index  # torch loads only when a checkpoint is checked

    try:
        index = read_index(path)
    except ValueError as exc:  # CheckpointError
        raise ValueError(f"it is not a BMInf checkpoint ({exc})") from None
    release = RELEASES.get(version)
    if release is None:
        return
    for name, (count, size) in release.blocks.items():
        sizes: Dict[str, int] = {}
        for key, entry in index.items():
            if key.startswith(name + "."):
                block = key[len(name) + 1:].split(".", 1)[0]
                sizes[block] = sizes.get(block, 0) + entry.nbytes
        if len(sizes) != count or set(sizes.values()) != {size}:
            raise ValueError(f"it is not the checkpoint of {version}: {len(sizes)} blocks under {name!r} of "
                             f"{', '.join(map(str, sorted(set(sizes.values())))) or 0} bytes; {version} has "
                             f"{count} of {size} bytes")
    total = sum(entry.nbytes for entry in index.values())
    if total != release.total:
        raise ValueError(f"it is not the checkpoint of {version}: {total} bytes of tensors; {version} has "
                         f"{release.total}")


def checker(version: str, filename: str) -> Optional[Callable[[str], None]]:
    """The structural check for ``filename`` of ``version``, if there is one."""
    return functools.partial(check_checkpoint, version=version) if filename == "checkpoint.pt" else None
