"""What every API does around a model call, in one place.

Each way into a frontend (TF Serving's REST API over ASGI, below ASGI and through RSGI,
TF Serving's gRPC services, the Open Inference Protocol's REST and gRPC) is an adapter of
two functions: ``parse`` turns its request into a ModelCall, ``answer`` turns the broker's
result into its own answer. ``Pipeline.run`` does the rest, the same for all of them:

1. the capacity gate: one count of calls waiting on the broker per frontend, across every
   API (``--max_concurrent_predictions``); beyond it Unavailable at once, before the
   request is parsed, so the admitted ones keep the CPU;
2. parse; the deadline: the server's (``--rest_api_timeout_in_ms``), or less when the
   caller asks (a gRPC deadline, ``X-Request-Timeout-Ms``);
3. the broker call the ModelCall names;
4. answer; errors: every failure leaves as a TFBrokerError, whose class carries its HTTP
   status and gRPC code (tfbroker/wire/errors.py), so each adapter maps errors one way;
   anything else is a bug, logged here and answered as Internal;
5. a successful predict, classify or regress of a model with a logging_config: offered to
   the request log;
6. the metrics: one observation per call, with its API (REST, GRPC) and status (499 when
   the caller went away);
7. when tracing is configured (tfbroker/runtime/tracing.py), a server span per call, the
   child of the caller's ``traceparent`` (a header, or gRPC metadata); its context goes to
   the broker with the request.

Health lives here too, since it is the pipeline's to say whether calls can succeed:
``ready`` is false while the frontend stops and until the broker has its initial models.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

from frontend.metrics import Metrics
from frontend.model_call import CLASSIFY, METADATA, MODEL_RUNS, PREDICT, REGRESS, RELOAD, REPOSITORY, STATUS, ModelCall
from frontend.request_log import RequestLog
from tfbroker.async_client import AsyncClient
from tfbroker.runtime.settings import FrontendConfig
from tfbroker.runtime.tracing import Tracer, trace_headers
from tfbroker.wire.errors import DeadlineExceeded, Internal, NotFound, TFBrokerError, Unavailable

log = logging.getLogger("tfbroker.frontend")

T = TypeVar("T")

class Pipeline:
    def __init__(self, client: AsyncClient, config: FrontendConfig, metrics: Metrics | None = None,
                 tracer: Tracer | None = None) -> None:
        self.client = client
        self.tracer = tracer
        self.request_log: RequestLog | None = None  # set once the frontend runs (frontend/request_log.py)
        self.config = config
        self.timeout_s = config.timeout_s
        self.limits = config.limits
        self.metrics = metrics
        self.waiting = 0  # calls waiting on the broker, every API's: the capacity gate's count
        self.stopping = False  # set when the frontend begins to stop: not ready from then on

    async def run(self, api: str, verb: str, model: str, parse: Callable[[], ModelCall | Awaitable[ModelCall]],
                  answer: Callable[[ModelCall, Any], T], headers: Any = ()) -> T:
        """``parse``, the broker call, ``answer``; TFBrokerError for every failure. ``verb``
        and ``model`` are what the request's path or RPC says, for the metrics. ``parse`` may
        answer at once or be awaited (a body still to read, a broker call on an error path).
        ``headers``: the request's (ASGI pairs, or a gRPC context), read only when tracing."""
        started = time.monotonic()
        status = 499  # unless answered: cancelled, the caller is gone
        span = None
        try:
            self.admit()
            self.waiting += 1
            try:
                call = parse()
                if not isinstance(call, ModelCall):
                    call = await call
                parsed = time.monotonic()
                if self.tracer is not None:
                    span = self._open_span(api, call, started, headers)
                if call.verb == PREDICT:  # (the hot path: no coroutine of its own)
                    result = await self.client.predict(
                        call.model, call.inputs, version=call.version, label=call.label,
                        signature_name=call.signature_name, timeout_s=self.deadline(call.timeout_s),
                        exact_dtypes=call.exact_dtypes, traceparent=call.trace)
                else:
                    result = await self.call(call)
                replied = time.monotonic()
                out = answer(call, result)
                if self.request_log is not None and call.verb in MODEL_RUNS:
                    self.request_log.offer(call, result)
                if self.metrics is not None and call.verb in MODEL_RUNS:
                    self.metrics.stages(model, parsed - started, time.monotonic() - replied)
                    if call.verb != PREDICT:  # classify, regress: TF Serving's request_example_counts
                        self.metrics.examples(model, len(call.inputs))
            finally:
                self.waiting -= 1
            status = 200
            return out
        except TFBrokerError as exc:
            status = exc.http_status
            raise
        except Exception as exc:  # a bug answers this call, not the process
            status = 500
            log.exception("%s %s failed", api, verb)
            raise Internal(f"frontend error: {type(exc).__name__}: {exc}") from exc
        finally:
            if self.metrics is not None:
                self.metrics.observe(model, verb, status, started, api, busy=self.waiting > 0)
            if span is not None:
                self._close_span(span, status)

    def admit(self) -> None:
        if self.waiting >= self.limits.max_concurrent_predictions:
            raise Unavailable(f"this frontend has {self.waiting} predictions waiting, its limit; retry later")

    def deadline(self, asked_s: float | None) -> float:
        """The server's deadline, or the caller's when it is sooner."""
        if asked_s is None:
            return self.timeout_s
        if asked_s <= 0:
            raise DeadlineExceeded()
        return min(self.timeout_s, asked_s)

    async def call(self, call: ModelCall) -> Any:
        """The broker call ``call`` names, but predict, which ``run`` makes itself (the gate is the caller's)."""
        client, verb = self.client, call.verb
        if verb in (CLASSIFY, REGRESS):
            run = client.classify if verb == CLASSIFY else client.regress
            return await run(call.model, call.inputs, version=call.version, label=call.label,
                             signature_name=call.signature_name, timeout_s=self.deadline(call.timeout_s),
                             traceparent=call.trace)
        if verb == METADATA:
            return await client.metadata(call.model, version=call.version, label=call.label)
        if verb == STATUS:
            return await client.status(call.model, version=call.version, label=call.label)
        if verb == RELOAD:
            return await client.reload_config(call.inputs)
        if verb == REPOSITORY:
            op, ready_only = call.inputs
            return await client.repository(op, call.model or None, ready_only=ready_only)
        raise AssertionError(f"no such call: {verb}")

    # --- tracing ---

    def _open_span(self, api: str, call: ModelCall, started: float, headers: Any) -> Any:
        """The call's server span, from its start, in the caller's trace if it sent one; None
        for a call without a caller's context that the sampler leaves out."""
        assert self.tracer is not None
        pairs = headers.invocation_metadata() if hasattr(headers, "invocation_metadata") else headers
        carrier = trace_headers(pairs or ())
        if not carrier and not self.tracer.sample_root():
            return None
        span = self.tracer.span(f"tfbroker {call.verb}", self.tracer.extract(carrier), started,
                                server=True, attributes={"tfbroker.api": api, "model.name": call.model,
                                                         "model.signature": call.signature_name})
        call.trace = self.tracer.traceparent(span)
        return span

    def _close_span(self, span: Any, status: int) -> None:
        assert self.tracer is not None
        self.tracer.end(span, time.monotonic(), attributes={"http.response.status_code": status},
                        error=None if status < 400 else f"HTTP {status}")

    # --- health ---

    async def ready(self, model: str | None = None, version: int | None = None, label: str | None = None
                    ) -> tuple[bool, str]:
        """Whether calls can succeed now, and why not: the frontend is not stopping and the
        broker answers that it serves its initial models (or ``model``, at ``version``).
        NotFound for a model or version the broker does not have."""
        if self.stopping:
            return False, "this frontend is stopping"
        try:
            health = await self.client.health(model, version=version, label=label)
        except NotFound:
            raise
        except TFBrokerError as exc:
            return False, exc.message
        return health.ready, health.reason
