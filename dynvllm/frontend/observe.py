"""What the frontend records about each request beyond its answer, through the request path's
hooks: its end-to-end latency (by model and status), its id on the log lines written while
serving it, and its trace when tracing is on (`dynvllm.tracing`)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from dynvllm.logs import REQUEST_ID
from dynvllm.tracing import RequestTrace, Tracing

if TYPE_CHECKING:
    from dynvllm.frontend.metrics import FrontendMetrics
    from dynvllm.frontend.request_path import Admitted, RequestPath

log = logging.getLogger("dynvllm.frontend")


class RequestObserver:
    def __init__(self, metrics: FrontendMetrics, tracing: Tracing | None) -> None:
        self.metrics, self.tracing = metrics, tracing

    def install(self, path: RequestPath) -> None:
        # First of the admission hooks, so the admission span covers quotas and queueing; an end
        # hook also runs for a request a later admission hook refused (429, 503).
        path.on_admit.insert(0, self.admit)
        path.on_end.append(self.end)

    async def admit(self, r: Admitted) -> None:
        REQUEST_ID.set(r.request_id)
        tracing = self.tracing
        if tracing is None:
            return
        attrs = {
            "dynvllm.request_id": r.request_id,
            "dynvllm.surface": r.surface,
            "dynvllm.model": r.model,
            # Resolving the model, tokenizing, budgeting, fetching images: before any hook ran.
            "dynvllm.prepare_seconds": time.monotonic() - r.arrived,
        }
        root = tracing.start("dynvllm.request", tracing.extract(r.client), r.arrived, True, attrs)
        if not root.is_recording():  # sampled out (OTEL_TRACES_SAMPLER): no spans below it either
            return
        trace = RequestTrace(tracing, root)
        trace.admission = tracing.start("admission", root)
        r.notes["trace"] = trace
        for d in r.dispatches:
            d.trace = trace

    def end(self, r: Admitted, status: str) -> None:
        m = self.metrics
        took = time.monotonic() - r.arrived
        m.of(m.request_duration, r.model, status).observe(took)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s request for %s ended with %s after %.3f s", r.surface, r.model, status, took)
        trace = r.notes.get("trace")
        if trace is not None:
            u = r.usage()
            tokens = {
                "dynvllm.prompt_tokens": u.prompt_tokens,
                "dynvllm.completion_tokens": u.completion_tokens,
            }
            trace.end(status, **tokens)
