"""Inputs an attacker can send the recognition service, and a way to see what they cost in memory."""
from __future__ import annotations

import ctypes
import gc
import io
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

MiB = 2**20


@cache
def flat_png(width: int, height: int) -> bytes:
    """A real RGBA PNG of one colour: tens of kB on the wire, width x height x 4 bytes once decoded."""
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 200, 30, 255)).save(out, format="PNG")
    return out.getvalue()


@cache
def photo_like_jpeg(width: int, height: int, progressive: bool = False) -> bytes:
    """A JPEG with photo-like detail (smooth shapes plus grain), megabytes at a few thousand pixels."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.integers(-12, 12, (height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, progressive=progressive)
    return out.getvalue()


def encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    """A valid image in any format Pillow can write (BMP, TIFF, GIF...)."""
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@contextmanager
def peak_memory():
    """`{"growth": bytes}`: how far this process's peak RSS rose above its RSS at entry. Freed heap is
    handed back first (malloc_trim) and the peak reset (/proc/self/clear_refs), so memory a decode
    touches shows even when an earlier one left it allocated."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    found = {"growth": 0}
    before = _status("VmRSS")
    try:
        yield found
    finally:
        found["growth"] = _status("VmHWM") - before
