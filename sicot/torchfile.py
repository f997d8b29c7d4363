"""Reading the torch files sicot writes (checkpoints, models, weights) without trusting them.

Every load is `weights_only`: a file holding anything but tensors and plain containers is refused
unread, because unpickling it could run code. A missing, truncated or foreign file ends as one
`TorchFileError` that names the file and says what to do, instead of an `EOFError` or PyTorch's advice
to turn the safety off.
"""
from __future__ import annotations

import io

from sicot import storage


class TorchFileError(ValueError):
    pass


def load(uri: str, what: str, map_location="cpu"):
    """The object in the torch file at `uri`; `what` names it in errors ("training checkpoint")."""
    import pickle
    import zipfile

    import torch

    data = storage.read_bytes(uri)  # FileNotFoundError passes through: callers say what to run first
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        foreign = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if foreign:
            raise TorchFileError(f"{uri}: refused: the {what} holds objects other than tensors, which sicot "
                                 f"never writes and which could run code when loaded ({foreign[0][:200]})") from None
        raise TorchFileError(f"{uri}: the {what} is damaged or not a torch file ({len(data)} bytes); "
                             "delete it and write it again") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise TorchFileError(f"{uri}: the {what} is damaged or truncated ({len(data)} bytes; "
                             f"{type(exc).__name__}: {str(exc).strip()[:200]}); delete it and write it again") from None
