"""Typed errors that cross process boundaries by name."""

from __future__ import annotations


class RemoteError(Exception):
    """A handler on another process failed; `kind` is its error type name."""

    kind = "RemoteError"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InstanceLost(RemoteError):
    """The instance serving a call went away (process died, connection dropped, lease expired)."""

    kind = "InstanceLost"


class BadRequest(RemoteError):
    """The caller sent something the handler cannot accept; retrying elsewhere will not help."""

    kind = "BadRequest"


class UnknownEndpoint(RemoteError):
    kind = "UnknownEndpoint"


_BY_KIND = {c.kind: c for c in (InstanceLost, BadRequest, UnknownEndpoint)}


def from_wire(kind: str, message: str) -> RemoteError:
    cls = _BY_KIND.get(kind)
    return cls(message) if cls else RemoteError(message, kind)


def kind_of(exc: BaseException) -> str:
    return exc.kind if isinstance(exc, RemoteError) else type(exc).__name__
