"""A ``torch.save`` state dict (``pytorch_model.bin``), read without running pickled code and
without trusting the sizes it declares: every failure is a ``CheckpointError`` naming the file.

>>> state = load_torch_state("CPM-Generate/pytorch_model.bin")     # doctest: +SKIP
"""
import os
import pickle
import struct
import zipfile
import zlib
from typing import Dict

import torch

from .common import CheckpointError

__all__ = ["load_torch_state"]


# what torch.load's unpickler raises on damaged bytes (a flipped bit in a legacy file gives IndexError,
# KeyError or a failed assert from deep inside it); all of them mean the same thing to the user
_CORRUPT_PICKLE = (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
                   AssertionError, struct.error, OverflowError, MemoryError)
# what zipfile raises on a damaged archive: bad names (UnicodeDecodeError), unknown compression, bad streams
_CORRUPT_ZIP = (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, IndexError, NotImplementedError,
                RuntimeError, struct.error, zlib.error)


# element sizes of the storage classes a legacy (pre-1.6) torch.save file names
_LEGACY_STORAGE_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                         "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                         "BoolStorage": 1}


class _Stub:
    """Stands for any global a legacy file names; calls, items and state set on it are ignored."""

    def __init__(self, name: str = ""):
        self.name = name

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setitem__(self, key, value):
        pass

    def __setstate__(self, state):
        pass


class _DeclaredStorages(pickle.Unpickler):
    """Reads one pickle of a legacy torch file building nothing, recording each storage's declared bytes."""

    def __init__(self, f):
        super().__init__(f)
        self.nbytes: Dict[str, int] = {}

    def find_class(self, module, name):
        return _Stub(name)

    def persistent_load(self, pid):
        # ('storage', storage class, key, location, numel, view metadata)
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        size = _LEGACY_STORAGE_BYTES.get(getattr(pid[1], "name", None))
        if size is None or pid[4] < 0:
            raise pickle.UnpicklingError(f"storage {pid[2]!r:.40} of unknown type or size")
        self.nbytes[str(pid[2])] = pid[4] * size


def _check_legacy_sizes(path: str) -> None:
    """torch.load allocates the storages a legacy file declares before reading their bytes: refuse
    declarations the file cannot hold, so a corrupt size never becomes a huge allocation."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            for _ in range(3):  # magic number, protocol version, system info
                _DeclaredStorages(f).load()
            scan = _DeclaredStorages(f)
            scan.load()
        except (pickle.UnpicklingError,) + _CORRUPT_PICKLE as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                                  f"{type(e).__name__}: {str(e)[:200]}") from None
    declared = sum(scan.nbytes.values())
    if declared > size:
        raise CheckpointError(f"{path}: corrupt: its tensors declare {declared} bytes, but the file has {size}")


def load_torch_state(path: str) -> Dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        # torch never checks the zip's CRCs, so a flipped byte in the data would load as garbage
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except _CORRUPT_ZIP as e:
            raise CheckpointError(f"{path}: not a readable zip archive (truncated or corrupt?): {e}") from None
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt: checksum mismatch in {bad}")
    else:
        _check_legacy_sizes(path)
    try:
        # weights_only=True uses torch's restricted unpickler: it rebuilds tensors and plain containers
        # only and refuses every other global, so a malicious pickle cannot run code. mmap leaves the
        # weights in the page cache instead of copying them all into memory at once.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: it pickles objects other than tensors "
                              f"({str(e).splitlines()[-1][:200]})") from None
    except _CORRUPT_PICKLE as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state
