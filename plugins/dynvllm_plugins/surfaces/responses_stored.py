"""Stored responses as the Responses routes reach them: this process's memory first (a hit costs
nothing more), then the namespace's shared store (`responses_shared`) where the frontend has a
NATS connection. GET, DELETE and cancel of /v1/responses/{id}, and the conversation a
`previous_response_id` continues.

Only the process that made a response keeps it in memory; the others read the shared record
each time and never keep a copy, so nothing they answer can be older than the record. A DELETE
or cancel that reaches another process is passed to the owning process (which stops the run,
forgets the response and writes the record); where that process is gone, the record alone is
changed: deleted, or, for a run that can no longer be reached, marked cancelled. A GET of a
running response elsewhere asks its process too (one round trip, while it runs): a run whose
process is gone is recorded as failed, rather than in_progress for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from dynvllm.frontend.errors import RequestError
from dynvllm_plugins.surfaces.responses_shared import Changed, Record, SharedResponses, Unreachable
from dynvllm_plugins.surfaces.responses_store import ResponseStore, Stored

log = logging.getLogger("dynvllm.frontend")
_json = msgspec.json.Encoder().encode


def not_found(rid: str, param: str, shared: bool) -> RequestError:
    where = (
        "by any frontend process of this namespace"
        if shared
        else "in the memory of the frontend process that created them"
    )
    return RequestError(
        404, f"Response with id {rid!r} not found (responses are kept with store: true, {where})", param=param
    )


def _error(err: RequestError) -> tuple[int, bytes]:
    return err.status, _json(err.body())


def _sync() -> RequestError:
    return RequestError(400, "Cannot cancel a synchronous response.", param="response_id")


def _finished(status: str) -> RequestError:
    return RequestError(400, f"Cannot cancel a response that is already {status}.", param="response_id")


def _unreachable(exc: Exception) -> RequestError:
    return RequestError(
        503,
        f"the shared store of responses is unreachable: {Unreachable.of(exc)}",
        "service_unavailable",
        code="unavailable",
    )


def _deleted(rid: str) -> tuple[int, bytes]:
    return 200, _json({"id": rid, "object": "response", "deleted": True})


class Kept:
    """The stored responses of one frontend process, and through `shared` those of the others."""

    def __init__(self, size: int) -> None:
        self.local = ResponseStore(size)
        self.size = size
        self.shared: SharedResponses | None = None
        self._warned = -1e9

    async def attach(self, nc: Any, namespace: str) -> None:
        """Share stored responses over `nc`; a NATS without JetStream leaves them in this
        process alone, with a warning."""
        shared = SharedResponses(nc, namespace, self.size)
        shared.body, shared.cancel, shared.delete = self.body_here, self.cancel_here, self.delete_here
        shared.events = self.events_here
        try:
            await shared.start()
        except Exception as exc:
            log.warning(
                "stored responses stay in each frontend process (the NATS server has no JetStream "
                "key-value store: %s)",
                exc,
            )
            return
        self.shared = shared

    async def detach(self) -> None:
        if self.shared is not None:
            await self.shared.stop()

    # ---- writing -----------------------------------------------------------------------------
    async def keep(self, rid: str, stored: Stored, status: str) -> None:
        """Keep a response made here: in memory, and in the shared store before its answer goes
        (a next request may reach any process)."""
        self.local.put(rid, stored)
        await self.share(rid, stored, status)

    async def share(self, rid: str, stored: Stored, status: str | None = None) -> None:
        """Write a response's record as it is now (a background response at each change)."""
        shared = self.shared
        if shared is None or stored.gone:
            return
        status = status or stored.body["status"]
        running = stored.running
        record = Record(
            shared.subject,
            status,
            stored.task is not None,
            stored.log is not None,
            stored.encoded(),
            None if running else _json(stored.conversation),
        )
        try:
            await shared.put(rid, record)
        except Unreachable as exc:  # kept here still; other processes will not find it
            now = time.monotonic()
            if now - self._warned >= 30:
                self._warned = now
                log.warning("stored responses not written to the shared store (from %s on): %s", rid, exc)

    # ---- reading -----------------------------------------------------------------------------
    async def record(self, rid: str) -> Record | None:
        if self.shared is None:
            return None
        try:
            return await self.shared.get(rid)
        except Unreachable as exc:
            raise _unreachable(exc) from None

    def missing(self, rid: str, param: str) -> RequestError:
        return not_found(rid, param, self.shared is not None)

    async def body(self, rid: str) -> bytes:
        stored = self.local.get(rid)
        if stored is not None:
            return stored.encoded()
        record = await self.record(rid)
        if record is None:
            raise self.missing(rid, "response_id")
        if record.running:
            assert self.shared is not None
            try:
                answer = await self.shared.ask(record.owner, "get", rid)
            except Unreachable:  # busy or away for now: the record as it is
                return record.body
            if answer is not None:
                return answer[1]
            return await self._lost(rid, record)
        return record.body

    def body_here(self, rid: str) -> tuple[int, bytes] | None:
        stored = self.local.get(rid)
        return None if stored is None else (200, stored.encoded())

    async def _lost(self, rid: str, record: Record) -> bytes:
        """Record a running response whose process is gone as failed (unless its record was
        written again or deleted since it was read: then as it is now)."""
        error = {"code": "server_error", "message": "the frontend process running this response stopped"}
        try:
            await self._restate(rid, record, "failed", error=error)
        except Changed:
            now = await self.record(rid)
            if now is None:
                raise self.missing(rid, "response_id") from None
            return now.body
        except Unreachable as exc:
            log.warning("response %s not recorded as failed: %s", rid, exc)
        return record.body

    async def _restate(self, rid: str, record: Record, status: str, **fields: Any) -> None:
        """Write `record` again with `status` (and `fields` in its body), unless it was written
        again or deleted since it was read (raises Changed; Unreachable where NATS is away)."""
        body = {**msgspec.json.decode(record.body), "status": status, **fields}
        record.body, record.status = _json(body), status
        assert self.shared is not None
        await self.shared.put(rid, record, since=record.revision)

    async def conversation(self, rid: str) -> list[dict[str, Any]]:
        """The conversation `previous_response_id` continues."""
        stored = self.local.get(rid)
        if stored is not None:
            status, running = (stored.body["status"], True) if stored.running else ("", False)
        else:
            record = await self.record(rid)
            if record is None:
                raise self.missing(rid, "previous_response_id")
            status, running = record.status, record.running
        if running:
            raise RequestError(
                400,
                f"Response {rid!r} is still {status}: continue it once it has finished",
                param="previous_response_id",
            )
        if stored is not None:
            return stored.conversation
        assert record is not None
        if record.conversation is None:  # its run's process stopped before it finished
            raise RequestError(
                400,
                f"Response {rid!r} is {status}: it has no conversation to continue",
                param="previous_response_id",
            )
        return msgspec.json.decode(record.conversation)

    async def events(self, rid: str, after: int) -> AsyncIterator[bytes]:
        """A streamed background response's events after sequence number `after`."""
        stored = self.local.get(rid)
        if stored is not None:
            if stored.log is None:
                raise _not_streamed()
            return stored.log.follow(after)
        record = await self.record(rid)
        if record is None:
            raise self.missing(rid, "response_id")
        if not record.streamed:
            raise _not_streamed()
        assert self.shared is not None
        try:
            followed = await self.shared.follow(record.owner, rid, after)
        except Exception as exc:
            raise _unreachable(exc) from None
        if followed is None:
            raise RequestError(
                404,
                f"the events of response {rid!r} were kept by the frontend process that ran it, "
                "which no longer has them; GET it without stream for its body",
                param="response_id",
            )
        return followed

    async def _elsewhere(self, rid: str) -> Record | tuple[int, bytes]:
        """The shared record of a response this process does not hold, or the error to answer."""
        try:
            record = await self.record(rid)
        except RequestError as exc:
            return _error(exc)
        return _error(self.missing(rid, "response_id")) if record is None else record

    # ---- changing ----------------------------------------------------------------------------
    async def delete(self, rid: str) -> tuple[int, bytes]:
        found = await self.delete_here(rid) or await self._elsewhere(rid)
        if isinstance(found, tuple):
            return found
        record = found
        assert self.shared is not None
        try:
            answer = await self.shared.ask(record.owner, "delete", rid)
            if answer is not None:  # the owner's own (a 503 where it could not purge)
                return answer
            await self.shared.purge(rid)
        except Exception as exc:
            return _error(_unreachable(exc))
        return _deleted(rid)

    async def delete_here(self, rid: str) -> tuple[int, bytes] | None:
        stored = self.local.pop(rid)
        if stored is None:
            return None
        stored.gone = True
        stored.drop()
        if self.shared is not None:
            try:
                await self.shared.purge(rid)
            except Exception as exc:
                return _error(_unreachable(exc))
        return _deleted(rid)

    async def cancel(self, rid: str) -> tuple[int, bytes]:
        found = await self.cancel_here(rid) or await self._elsewhere(rid)
        if isinstance(found, tuple):
            return found
        record = found
        if not record.background:
            return _error(_sync())
        assert self.shared is not None
        if record.running:
            try:
                answer = await self.shared.ask(record.owner, "cancel", rid)
                if answer is not None:
                    return answer
                # Its process is gone, and its run with it: the record says what became of it.
                await self._restate(rid, record, "cancelled")
            except Changed:  # finished or deleted by its owner meanwhile: as it is now
                return await self.cancel(rid)
            except Unreachable as exc:
                return _error(_unreachable(exc))
            return 200, record.body
        if record.status != "cancelled":
            return _error(_finished(record.status))
        return 200, record.body

    async def cancel_here(self, rid: str) -> tuple[int, bytes] | None:
        stored = self.local.get(rid)
        if stored is None:
            return None
        if stored.task is None:
            return _error(_sync())
        status = stored.body["status"]
        if stored.running:
            task = stored.task
            task.cancel()
            # The run ends (its worker request aborted, its record written) before the answer.
            await asyncio.gather(task, return_exceptions=True)
            if stored.running:  # cancelled before its task ever ran
                stored.body = {**stored.body, "status": "cancelled"}
                if stored.log is not None:
                    stored.log.add([], end=True)
                await self.share(rid, stored)
        elif status != "cancelled":
            return _error(_finished(status))
        return 200, stored.encoded()

    def events_here(self, rid: str, after: int) -> AsyncIterator[bytes] | None:
        stored = self.local.get(rid)
        if stored is None or stored.log is None:
            return None
        return stored.log.follow(after)


def _not_streamed() -> RequestError:
    return RequestError(
        400, "only a response created with background and stream can be streamed again", param="stream"
    )
