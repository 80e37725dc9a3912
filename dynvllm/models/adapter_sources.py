"""Where a LoRA adapter comes from: a local folder, `file://`, `hf://org/repo[@rev]`, `s3://`.

Sources are limited to allowed schemes and, for local folders, to allowed roots: the path is
resolved (symlinks and `..` included) before it is compared, so neither traversal nor a link
can reach outside a root. Pure logic apart from the download itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

SCHEMES = ("file", "hf", "s3")


class SourceError(ValueError):
    """The source cannot be used; the message says why and what to change."""


@dataclass(frozen=True)
class Source:
    scheme: str
    location: str  # a local path, an hf repo id, or bucket/key prefix
    revision: str | None = None


def parse_source(uri: str) -> Source:
    if not uri:
        raise SourceError("the adapter source is empty")
    if "://" not in uri:
        return Source("file", uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return Source("file", parsed.path or parsed.netloc)
    if scheme == "hf":
        repo = (parsed.netloc + parsed.path).strip("/")
        repo, _, rev = repo.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise SourceError(f"hf sources look like hf://org/repo[@revision]; got {uri!r}")
        return Source("hf", repo, rev or None)
    if scheme == "s3":
        if not parsed.netloc:
            raise SourceError(f"s3 sources look like s3://bucket/prefix; got {uri!r}")
        return Source("s3", parsed.netloc + parsed.path.rstrip("/"))
    raise SourceError(
        f"unsupported adapter source scheme {scheme!r}; use a local folder, file://, hf:// or s3://"
    )


def check_local(path: str, roots: list[str]) -> Path:
    """The resolved folder, if it lies under one of the allowed roots (after resolving links)."""
    if not roots:
        raise SourceError(
            "local adapter folders are disabled: start workers with --lora-roots DIR[,DIR] (DYN_LORA_ROOTS) "
            "to allow folders under DIR"
        )
    real = Path(os.path.realpath(path))
    for root in roots:
        base = Path(os.path.realpath(root))
        if real == base or base in real.parents:
            break
    else:
        raise SourceError(
            f"{path!r} resolves to {str(real)!r}, outside the allowed roots ({', '.join(roots)})"
        )
    if not (real / "adapter_config.json").is_file():
        raise SourceError(f"{path!r} is not a LoRA adapter folder (no adapter_config.json)")
    return real


def resolve(uri: str, roots: list[str], schemes: list[str], cache_dir: str) -> Path:
    """A local folder holding the adapter, downloading it first when the source is remote."""
    src = parse_source(uri)
    if src.scheme not in schemes:
        raise SourceError(
            f"{src.scheme}:// adapter sources are not allowed here (allowed: {', '.join(schemes)})"
        )
    if src.scheme == "file":
        return check_local(src.location, roots)
    if src.scheme == "hf":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(src.location, revision=src.revision, cache_dir=cache_dir or None))
        except Exception as exc:  # network, auth, missing repo: the message is the hub's
            raise SourceError(f"cannot download {uri!r} from the Hugging Face hub: {exc}") from None
    return _from_s3(src, cache_dir)


def _from_s3(src: Source, cache_dir: str) -> Path:
    try:
        import boto3
    except ImportError:
        raise SourceError("s3:// adapter sources need the boto3 package: pip install boto3") from None
    bucket, _, prefix = src.location.partition("/")
    dest = Path(cache_dir or Path.home() / ".cache" / "dynvllm" / "adapters") / "s3" / bucket / prefix
    client = boto3.client("s3")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :].lstrip("/")
            if not rel or ".." in Path(rel).parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
    if not (dest / "adapter_config.json").is_file():
        raise SourceError(f"s3://{src.location} holds no adapter_config.json")
    return dest
