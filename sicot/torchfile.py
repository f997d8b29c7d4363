"""Reading the torch files sicot writes (checkpoints, models, weights) without trusting them.

Every load is `weights_only`: a file holding anything but tensors and plain containers is refused
unread, because unpickling it could run code. A missing, truncated or foreign file ends as one
`TorchFileError` that names the file and says what to do, instead of an `EOFError` or PyTorch's advice
to turn the safety off.
"""
from __future__ import annotations

import io
import os

from sicot import storage


class TorchFileError(ValueError):
    pass


def load(uri: str, what: str, map_location="cpu"):
    """The object in the torch file at `uri`; `what` names it in errors ("training checkpoint")."""
    import torch

    data = storage.read_bytes(uri)  # FileNotFoundError passes through: callers say what to run first
    return _guarded(lambda: torch.load(io.BytesIO(data), map_location=map_location, weights_only=True),
                    uri, what, len(data))


def load_mapped(path: str, what: str, uri: str | None = None):
    """The object in the local torch file `path`, memory-mapped: a tensor's bytes are read from disk only
    when touched, so a large W costs memory only for the rows used. Errors name `uri`, where the file
    came from (default: `path`)."""
    import torch

    size = os.path.getsize(path)  # FileNotFoundError passes through
    return _guarded(lambda: torch.load(path, map_location="cpu", mmap=True, weights_only=True), uri or path, what, size)


def _guarded(read, uri: str, what: str, size: int):
    import pickle
    import zipfile

    try:
        return read()
    except pickle.UnpicklingError as exc:
        foreign = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if foreign:
            raise TorchFileError(f"{uri}: refused: the {what} holds objects other than tensors, which sicot "
                                 f"never writes and which could run code when loaded ({foreign[0][:200]})") from None
        raise TorchFileError(f"{uri}: the {what} is damaged or not a torch file ({size} bytes); "
                             "delete it and write it again") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise TorchFileError(f"{uri}: the {what} is damaged or truncated ({size} bytes; "
                             f"{type(exc).__name__}: {str(exc).strip()[:200]}); delete it and write it again") from None
