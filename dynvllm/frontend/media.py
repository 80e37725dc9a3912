"""Image inputs of chat requests: data: URIs, http(s) URLs and local files, fetched under limits.

Every failure is the client's to fix and says why (400): an unknown scheme, a private address, a
file outside the allowed folders, too many bytes, too slow, too many redirects, not an image.
The bytes travel to the worker as they came (after checking that they decode), so the engine's
own processor sees exactly what the client sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from dynvllm.frontend.errors import RequestError as APIError
from dynvllm.settings import FrontendSettings

MAX_REDIRECTS = 3
MAX_PIXELS = 64 * 1024 * 1024  # decompression bombs stop here


@dataclass(frozen=True)
class MediaPolicy:
    roots: tuple[Path, ...] = ()
    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0
    max_images: int = 8

    @classmethod
    def from_settings(cls, s: FrontendSettings) -> MediaPolicy:
        return cls(
            tuple(Path(r).resolve() for r in s.media_roots()),
            s.allow_private_media_urls,
            s.media_max_bytes,
            s.media_fetch_timeout,
            s.max_images_per_request,
        )


def _bad(message: str) -> APIError:
    return APIError(400, message, param="messages.content.image_url")


def check_image(data: bytes, policy: MediaPolicy, where: str) -> bytes:
    """The bytes, once they are known to decode as an image within the limits."""
    from PIL import Image

    if len(data) > policy.max_bytes:
        raise _bad(f"image {where} is {len(data)} bytes; the limit is {policy.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise _bad(f"image {where} has {w}x{h} pixels; the limit is {MAX_PIXELS}")
            img.load()  # verify() misses truncated pixel data; a full decode does not
    except APIError:
        raise
    except Exception as exc:
        raise _bad(f"image {where} cannot be decoded: {type(exc).__name__}: {exc}") from None
    return data


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_uri(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise _bad("a data: URI needs the form data:image/...;base64,<data>")
    if not head.endswith(";base64"):
        raise _bad("only base64 data: URIs are accepted for images")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data: URI is not valid base64") from None


def _local_file(url: str, policy: MediaPolicy) -> bytes:
    if not policy.roots:
        raise _bad("local image files are refused: the server has no --allowed-local-media-path")
    raw = unquote(urlparse(url).path)
    path = Path(raw).resolve()  # links and '..' resolved before the check
    if not any(path == root or root in path.parents for root in policy.roots):
        raise _bad(f"{raw} is outside the allowed media folders")
    try:
        size = path.stat().st_size
        if size > policy.max_bytes:
            raise _bad(f"image file {raw} is {size} bytes; the limit is {policy.max_bytes}")
        return path.read_bytes()
    except OSError as exc:
        raise _bad(f"cannot read {raw}: {exc.strerror or exc}") from None


def _public(host: str) -> None:
    """Refuse hosts that resolve to private, loopback, link-local or otherwise internal addresses."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise _bad(f"cannot resolve image host {host!r}: {exc}") from None
    for info in infos:
        # str(): the stubs allow an int here (AF_UNIX-style addresses); TCP lookups give text.
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not addr.is_global:
            raise _bad(f"image host {host!r} resolves to a non-public address ({addr}); refused")


async def _http(url: str, policy: MediaPolicy) -> bytes:
    import httpx

    async with httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host = urlparse(url).hostname or ""
            if not policy.allow_private:
                await asyncio.get_running_loop().run_in_executor(None, _public, host)
            async with client.stream("GET", url) as r:
                if r.is_redirect:
                    url = urljoin(url, r.headers.get("location", ""))
                    if urlparse(url).scheme not in ("http", "https"):
                        raise _bad("an image URL redirected to a scheme other than http(s)")
                    continue
                if r.status_code != 200:
                    raise _bad(f"fetching the image gave HTTP {r.status_code}")
                declared = int(r.headers.get("content-length") or 0)
                if declared > policy.max_bytes:
                    raise _bad(f"the image is {declared} bytes; the limit is {policy.max_bytes}")
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise _bad(f"the image is over the limit of {policy.max_bytes} bytes")
                return bytes(body)
        raise _bad(f"the image URL redirected more than {MAX_REDIRECTS} times")


async def fetch(url: str, policy: MediaPolicy) -> bytes:
    """The checked bytes of one image reference."""
    if not isinstance(url, str) or not url:
        raise _bad("image_url needs a url")
    scheme = urlparse(url).scheme.lower() if not url.startswith("data:") else "data"
    try:
        if scheme == "data":
            data = _data_uri(url)
        elif scheme == "file":
            data = await asyncio.get_running_loop().run_in_executor(None, _local_file, url, policy)
        elif scheme in ("http", "https"):
            data = await asyncio.wait_for(_http(url, policy), policy.timeout)
        else:
            raise _bad(
                f"image URL scheme {scheme or '(none)'!r} is not supported; use http(s), data: or file:"
            )
    except TimeoutError:
        raise _bad(f"fetching the image took longer than {policy.timeout:g} s") from None
    except APIError:
        raise
    except Exception as exc:  # connection refused, TLS, malformed URL ...
        raise _bad(f"cannot fetch the image: {type(exc).__name__}: {exc}") from None
    where = url[:60] + ("..." if len(url) > 60 else "") if scheme != "data" else "(data: URI)"
    return check_image(data, policy, where)


async def fetch_all(urls: list[str], policy: MediaPolicy) -> list[bytes]:
    if len(urls) > policy.max_images:
        raise _bad(f"{len(urls)} images in one request; the limit is {policy.max_images}")
    return list(await asyncio.gather(*(fetch(u, policy) for u in urls)))
