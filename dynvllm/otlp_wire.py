"""OTLP's protobuf encoding of a batch of spans (an `ExportTraceServiceRequest`), written directly.

The exporter's own encoder builds a protobuf message for every span, attribute and event and
then copies them into their parents: ~23 us a span here, more than recording it. The spans this
project makes have scalar attributes, events and no links; those are written as bytes here, in
the schema's field order, and anything else (a list attribute, a link, a span from another
tracer) leaves the batch to the exporter's encoder. The output parses to the same message as the
exporter's (tests/test_tracing.py compares them field by field).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_Q = struct.Struct("<Q").pack
_D = struct.Struct("<d").pack
_I = struct.Struct("<I").pack

#: SpanFlags: the parent's remoteness is known (0x100) and it is remote (0x200).
_LOCAL_PARENT = b"\x85\x01" + _I(0x100)
_REMOTE_PARENT = b"\x85\x01" + _I(0x300)
#: Status: the SDK writes an empty Status message for a span whose status was not set.
_UNSET_STATUS = b"\x7a\x00"


class Unsupported(Exception):
    """A span this encoder does not write (the exporter's encoder does)."""


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(data)) + data


def _value(value: Any) -> bytes:
    """An AnyValue of a scalar (a oneof: written even when it is the type's default)."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise Unsupported("an integer beyond int64")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _D(value)
    raise Unsupported(type(value).__name__)


class _Attributes:
    """KeyValue lists, the key's bytes and each string value's bytes remembered (few distinct)."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._strings: dict[tuple[str, str], bytes] = {}

    def encode(self, tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
        if not attributes:
            return []
        out = []
        for key, value in attributes.items():
            if type(value) is str:
                kv = self._strings.get((key, value))
                if kv is None:
                    kv = self._kv(key, value)
                    if len(self._strings) < 4096:
                        self._strings[(key, value)] = kv
            else:
                kv = self._kv(key, value)
            out.append(tag + _varint(len(kv)) + kv)
        return out

    def _kv(self, key: str, value: Any) -> bytes:
        k = self._keys.get(key)
        if k is None:
            k = self._keys[key] = _field(b"\x0a", key.encode())
        return k + _field(b"\x12", _value(value))


class SpanEncoder:
    """Encodes batches of spans of one resource and instrumentation scope; `fallback` encodes
    (to bytes) a batch that holds anything else."""

    def __init__(self, fallback: Callable[[Sequence[Any]], bytes]) -> None:
        self._fallback = fallback
        self._attrs = _Attributes()
        self._envelope: tuple[Any, Any, bytes, bytes, bytes] | None = None
        self._kinds: dict[Any, bytes] = {}

    def __call__(self, spans: Sequence[Any]) -> bytes:
        try:
            return self._encode(spans)
        except Exception:  # Unsupported, or a field of a type not expected (a span without times)
            return self._fallback(spans)

    def _encode(self, spans: Sequence[Any]) -> bytes:
        if not spans:
            return b""
        first = spans[0]
        resource, scope = first.resource, first.instrumentation_scope
        head, tail, scope_head = self._head(resource, scope)
        body = [scope_head]
        for span in spans:
            if span.resource is not resource or span.instrumentation_scope is not scope:
                raise Unsupported("several resources or scopes")
            body.append(_field(b"\x12", self._span(span)))
        scope_spans = _field(b"\x12", b"".join(body))
        return _field(b"\x0a", head + scope_spans + tail)

    def _head(self, resource: Any, scope: Any) -> tuple[bytes, bytes, bytes]:
        """The ResourceSpans' resource (before the scope's spans) and schema url (after), and the
        ScopeSpans' scope: the same for every batch of this process."""
        e = self._envelope
        if e is None or e[0] is not resource or e[1] is not scope:
            from opentelemetry.exporter.otlp.proto.common._internal import (
                _encode_instrumentation_scope,
                _encode_resource,
            )

            head = _field(b"\x0a", _encode_resource(resource).SerializeToString())
            tail = _field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""
            scope_head = _field(b"\x0a", _encode_instrumentation_scope(scope).SerializeToString())
            if scope is not None and scope.schema_url:
                raise Unsupported("a scope's schema url")
            e = self._envelope = (resource, scope, head, tail, scope_head)
        return e[2], e[3], e[4]

    def _span(self, span: Any) -> bytes:
        if span.links or span.dropped_attributes or span.dropped_events:
            raise Unsupported("links or dropped items")
        ctx, parent = span.context, span.parent
        out = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08", ctx.span_id.to_bytes(8, "big")]
        if ctx.trace_state:
            out.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode()))
        if parent:
            out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        out.append(_field(b"\x2a", span.name.encode()))
        kind = self._kinds.get(span.kind)
        if kind is None:
            kind = self._kinds[span.kind] = b"\x30" + _varint(span.kind.value + 1)
        out += (kind, b"\x39", _Q(span.start_time), b"\x41", _Q(span.end_time))
        out += self._attrs.encode(b"\x4a", span.attributes)
        for event in span.events:
            e = [b"\x09", _Q(event.timestamp), _field(b"\x12", event.name.encode())]
            e += self._attrs.encode(b"\x1a", event.attributes)
            if event.dropped_attributes:
                raise Unsupported("dropped event attributes")
            out.append(_field(b"\x5a", b"".join(e)))
        status = span.status
        if status.status_code.value == 0 and not status.description:
            out.append(_UNSET_STATUS)
        else:
            st = (_field(b"\x12", status.description.encode()) if status.description else b"") + (
                b"\x18" + _varint(status.status_code.value) if status.status_code.value else b""
            )
            out.append(_field(b"\x7a", st))
        out.append(_REMOTE_PARENT if parent is not None and parent.is_remote else _LOCAL_PARENT)
        return b"".join(out)
