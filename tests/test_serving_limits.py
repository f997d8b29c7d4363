"""Hostile input to the recognition service, below the model: the shared decoder's allow-list, clean
error texts and reduced-scale JPEG decoding, and the HTTP body limit as an ASGI middleware. Each attack
is shown to work without the guard first. (With a trained model and real servers: tests/test_serving.py.)
"""
from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import BmpImagePlugin, GifImagePlugin, Image, TiffImagePlugin, UnidentifiedImageError

from sicot.data.images import FormatNotAccepted, ImageError, decode_opened, open_image, to_uint8
from tests.hostile_input import MiB, encoded, peak_memory, photo_like_jpeg

SERVED = ("JPEG", "PNG", "WEBP")
PARSERS = {"BMP": BmpImagePlugin.BmpImageFile, "TIFF": TiffImagePlugin.TiffImageFile,
           "GIF": GifImagePlugin.GifImageFile}


@pytest.mark.parametrize("fmt", sorted(PARSERS))
def test_a_format_outside_the_allow_list_is_refused_before_its_parser_runs(fmt, monkeypatch):
    parsed = []
    real = PARSERS[fmt]._open
    monkeypatch.setattr(PARSERS[fmt], "_open", lambda self: parsed.append(fmt) or real(self))
    data = encoded(fmt)
    assert open_image(data).format == fmt and parsed == [fmt]  # without an allow-list: parsed

    parsed.clear()
    with pytest.raises(FormatNotAccepted) as refused:
        open_image(data, SERVED)
    assert str(refused.value) == f"{fmt} is not one of the accepted formats JPEG, PNG, WEBP"
    assert parsed == []


def test_error_texts_say_why_without_object_reprs():
    text = b"this is a product description, not a photo"
    with pytest.raises(UnidentifiedImageError, match="object at 0x"):  # what Pillow itself says
        Image.open(io.BytesIO(text))
    for data, formats, message in [
        (text, None, "not a recognised image format"),
        (text, SERVED, "not a recognised image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, SERVED, "not a recognised image format (a damaged PNG header)"),
    ]:
        with pytest.raises(ImageError) as refused:
            open_image(data, formats)
        assert str(refused.value) == message


def test_a_large_jpeg_decodes_at_reduced_scale_to_the_same_model_input():
    data = photo_like_jpeg(4000, 3000)
    with peak_memory() as full_cost:
        full = to_uint8(decode_opened(open_image(data)), 32)
    with peak_memory() as reduced_cost:
        img = decode_opened(open_image(data), min_size=8 * 32)
        reduced = to_uint8(img, 32)
    assert img.size == (500, 375)  # 1/8 scale: both sides still over 8 x 32
    assert full_cost["growth"] > 40 * MiB and reduced_cost["growth"] < 10 * MiB, (full_cost, reduced_cost)
    assert np.abs(full.astype(int) - reduced.astype(int)).max() <= 3


def test_serve_formats_must_name_pillow_formats():
    from sicot.serving import accepted_formats

    assert accepted_formats(" jpeg, PNG ,webp") == SERVED
    with pytest.raises(ValueError, match=r"serve.formats: 'JPEG,JPG' .*\(JPG is not one\)"):
        accepted_formats("JPEG,JPG")
    with pytest.raises(ValueError, match="serve.formats"):
        accepted_formats(" , ")


# ---- the body limit, as an ASGI middleware ---------------------------------------------------------

def call(limit: int, headers: dict[bytes, bytes], chunks: list[bytes]) -> dict:
    """Run one request through `BodyLimit(app, limit)`: what the app saw, the reply, and how many body
    messages were read from the client."""
    from sicot.serving_app import BodyLimit

    seen = {"app_bodies": None, "read": 0, "status": None, "reply": b""}

    async def app(scope, receive, send):
        message = await receive()
        seen["app_bodies"] = [(message["body"], message["more_body"])]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        i = seen["read"]
        seen["read"] += 1
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    async def send(message):
        if message["type"] == "http.response.start":
            seen["status"] = message["status"]
        else:
            seen["reply"] += message["body"]

    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": list(headers.items())}
    asyncio.run(BodyLimit(app, limit)(scope, receive, send))
    return seen


def test_a_declared_oversize_body_is_refused_before_a_byte_of_it_is_read():
    seen = call(100, {b"content-length": b"101"}, [b"x" * 101])
    assert seen["status"] == 413 and seen["read"] == 0 and seen["app_bodies"] is None
    assert b"request body is 101 bytes; at most 100 bytes per request (serve.max_request_bytes)" in seen["reply"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit():
    seen = call(100, {}, [b"x" * 60, b"x" * 60, b"x" * 60, b"x" * 60])
    assert seen["status"] == 413 and seen["read"] == 2 and seen["app_bodies"] is None
    assert b"request body is over 100 bytes" in seen["reply"]


def test_a_body_within_the_limit_reaches_the_app_whole():
    seen = call(100, {b"content-length": b"100"}, [b"a" * 40, b"b" * 60])
    assert seen["status"] == 200 and seen["app_bodies"] == [(b"a" * 40 + b"b" * 60, False)]
    assert call(100, {}, [b""])["status"] == 200  # a GET: no body at all
