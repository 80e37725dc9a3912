"""Image references are checked before anything is fetched or decoded."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest

from dynvllm.frontend.media import MediaPolicy, check_image, fetch, fetch_all
from dynvllm.frontend.openai.schema import APIError


def _png(w: int = 8, h: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _run(coro):
    return asyncio.run(coro)


def test_data_uri_round_trips():
    data = _png()
    assert _run(fetch("data:image/png;base64," + base64.b64encode(data).decode(), MediaPolicy())) == data


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("", "needs a url"),
        ("gopher://x/y.png", "scheme 'gopher'"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("file:///etc/hostname", "no --allowed-local-media-path"),
        ("http://localhost:1/x.png", "non-public address"),
        ("http://10.0.0.1/x.png", "non-public address"),
        ("http://[::1]/x.png", "non-public address"),
    ],
)
def test_refusals_name_the_reason(url, needle):
    with pytest.raises(APIError, match=needle) as err:
        _run(fetch(url, MediaPolicy()))
    assert err.value.status == 400


def test_files_only_under_the_allowed_roots(tmp_path):
    inside = tmp_path / "ok"
    inside.mkdir()
    (inside / "a.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    policy = MediaPolicy(roots=(inside.resolve(),))
    assert _run(fetch((inside / "a.png").as_uri(), policy)) == _png()
    for bad in (f"file://{inside}/../secret.png", (inside / "link.png").as_uri()):
        with pytest.raises(APIError, match="outside the allowed media folders"):
            _run(fetch(bad, policy))


def test_size_pixels_and_count_limits():
    with pytest.raises(APIError, match="limit is 10"):
        check_image(_png(), MediaPolicy(max_bytes=10), "x")
    with pytest.raises(APIError, match="cannot be decoded"):
        check_image(_png()[:40], MediaPolicy(), "x")
    with pytest.raises(APIError, match="3 images in one request; the limit is 2"):
        _run(fetch_all(["a", "b", "c"], MediaPolicy(max_images=2)))
