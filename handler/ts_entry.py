"""TorchServe entry point: the only module of loraplex that imports `ts`.

The archive copies this file to the top of the model dir and TorchServe imports
it as a top-level module, so it uses absolute imports of the installed
`handler` package (never relative ones).

TorchServe's contract (ts/torch_handler/base_handler.py): `initialize(context)`
once per worker process, then `handle(data, context)` for each batch the
frontend assembles, returning one output per request (any other count fails the
whole batch with TorchServe's 503, so `handle` never raises and always returns
one output per request).

Two ways TorchServe calls `handle`, chosen by model-config.yaml's `asyncCommunication`:
- synchronous (`asyncCommunication` off; `scheduler: static` archives): the worker
  thread calls `handle` for one batch at a time and sends its list; `handle` calls
  `service.handle_batch`. A `stream: true` request gets its whole answer in the
  stream's format (stream_format.py: one text chunk, then the last chunk).
- asynchronous (`asyncCommunication: true`, the default with `scheduler: continuous`):
  ts/async_service.py runs an asyncio loop; for each message (one request with
  `batchSize: 1`; up to batchSize when a config sets more) it awaits
  `handle(...)`, which then returns a coroutine (`handle` itself stays a plain
  method). On the loop thread, per request: `service.submit(raw, loop)` (run in a
  small thread pool, since it checks keys and tokenizes) gives a Reply at once or a
  Ticket; a non-streamed request awaits its `Finished`; a streamed one sends each
  `TextDelta` as one HTTP chunk (`send_intermediate_predict_response`) and returns
  the last chunk. A describe runs `service.describe()` (thread-safe) in the pool.
  Every inference reply ends with a message marked ``ts_stream_next: false``
  (`_release_job`), without which TorchServe's frontend never forgets the job.
  The frontend does not tell the worker when a client goes away: an abandoned row
  runs until it finishes or `request_timeout_s`.

Every request in a batch gets its own status through
`context.set_response_status(code, phrase, idx)`, so a bad request fails alone. A
streamed request's status is the one of its first chunk: errors before it are an
ordinary error reply, errors after it the stream's last chunk.

Two writers on one socket (asynchronous mode). async_service's `send_responses`
thread writes each final response with `cl_socket.sendall` while intermediate
chunks are written with `sendall` on the same socket from the loop thread.
Nothing in TorchServe 0.12 orders the two: each `sendall` is one message, but a
message larger than what one `send()` call passes (a full socket buffer, or a
message beyond one kernel buffer, e.g. a long reply with logprobs) is written in
pieces, and the other thread's message can land between them, corrupting the
frame stream the frontend reads. So on the first asynchronous call (before any
response can have been written) the socket object's class is switched to
`SerialSendSocket`, a `socket.socket` whose `sendall` holds one lock: both
threads then write whole messages, one at a time. If the socket is not a plain
`socket.socket` (another TorchServe) the guard is not installed and that is logged.

What the frontend sends (TorchServe 0.12, observed on a real server):
- a management describe (`GET /models/<name>?customized=true`) is a batch of one
  request with a `describe: True` header, no input and no `explain` header.
  Every REST inference request (/predictions, /explanations and the KServe
  routes /v1/models/<m>:predict, /v2/models/<m>/infer) carries an `explain`
  header the frontend sets, overwriting a client's; /predictions also gets
  `url_path`: "" for /predictions/<m> and /predictions/<m>/<v>, else what follows
  /predictions/<m>/<v>/ (`v1/chat/completions`), which
  overwrites a client's `url_path` (handler/routes.py dispatches on it;
  tests/e2e/test_openai_client.py). A gRPC request passes no client headers (its input map becomes
  parameters). BaseHandler takes any batch whose first request carries
  `describe: True` for a describe, so a client could read the management view
  over the inference API and fail the rest of its batch; `is_management_describe`
  accepts only the management shape.
- the HTTP method is not passed on: GET, PUT, DELETE … on /predictions reach
  `handle` exactly like a POST (an empty body gets 400).
- headers arrive as one dict: of two headers spelt alike the frontend keeps the
  last; differently spelt copies are separate keys (request.py refuses those).
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.protocol.otf_message_handler import create_predict_response
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from loraplex_common.config import LoraplexConfig

from handler.metrics import TS_METRICS, EppEndpoint, MetricDef
from handler.routes import route_for
from handler.scheduler import Finished
from handler.service import LoraplexService, RawRequest, Reply
from handler.stream_format import ChunkStream, stream_for

log = logging.getLogger(__name__)


class LoraplexHandler(BaseHandler):
    SUBMIT_THREADS = 4  # asynchronous mode: threads that run submit/describe off the event loop

    def __init__(self) -> None:
        super().__init__()
        self.service: LoraplexService | None = None
        self.async_mode = False
        self._pool: ThreadPoolExecutor | None = None  # asynchronous mode, continuous scheduler
        self._serial: ThreadPoolExecutor | None = None  # asynchronous mode, static scheduler: one call at a time
        self._sends_serialised = False

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props.get("model_dir"))
        # TorchServe has parsed model-config.yaml already; its `handler:` section sits below env
        # LORAPLEX_* in the one precedence order.
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        section = yaml_config.get("handler") or {}
        config = LoraplexConfig.load(handler_section=section)
        start = time.monotonic()
        self.service = LoraplexService.from_model_dir(model_dir, config)
        self.service.metrics.sinks.append(self.TorchServeMetrics(context.metrics))
        if config.epp_metrics_address:
            try:
                self.service.metrics.sinks.append(EppEndpoint(config.epp_metrics_address))
            except OSError as exc:  # e.g. a second worker of this model: the first one holds the port
                log.error("epp_metrics_address %s: %s; this worker serves without the LoRA gauge",
                          config.epp_metrics_address, exc)
        self.async_mode = bool(yaml_config.get("asyncCommunication"))
        if self.async_mode and int(props.get("batch_size") or 1) > 1:
            log.error("asyncCommunication with batchSize %s: TorchServe 0.12's frontend fails as soon as two "
                      "requests queue (ConcurrentModificationException in AsyncBatchAggregator); set batchSize 1",
                      props.get("batch_size"))
        if self.async_mode and self.service.scheduler_kind != "continuous":
            log.warning("asyncCommunication is on but the scheduler is %s: requests are served a batch at a time",
                        self.service.scheduler_kind)
        self.context = context
        self.initialized = True
        log.info("loraplex worker ready in %.1fs (engine=%s, scheduler=%s, %s TorchServe, num_slots=%d, "
                 "resident_adapters=%d)", time.monotonic() - start, config.engine, self.service.scheduler_kind,
                 "asynchronous" if self.async_mode else "synchronous", config.num_slots, config.resident_adapters)

    def handle(self, data, context):
        """Synchronous TorchServe: the outputs. Asynchronous: a coroutine that async_service awaits."""
        if self.async_mode:
            return self._handle_async(data, context)
        self.context = context
        start = time.time()
        if is_management_describe(data, context):
            output = [self.describe_handle()]
        else:
            batch = _raw_requests(data, context)
            output = [self._write(context, idx, reply, _stream_of(batch[idx]))
                      for idx, reply in enumerate(self._serve_batch(batch))]
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    def describe_handle(self):
        return json.dumps(self.service.describe())

    # -- asynchronous TorchServe (event loop thread) ----------------------------------------------

    async def _handle_async(self, data, context) -> list[str]:
        start = time.time()
        self._serialise_sends(context)
        loop = asyncio.get_running_loop()
        if self.service.scheduler_kind != "continuous":  # no tickets: handle_batch, one call at a time
            if self._serial is None:
                self._serial = ThreadPoolExecutor(1, thread_name_prefix="loraplex-batch")
            if is_management_describe(data, context):
                output = [await loop.run_in_executor(self._serial, self.describe_handle)]
            else:
                batch = _raw_requests(data, context)
                replies = await loop.run_in_executor(self._serial, self._serve_batch, batch)
                output = [self._release_job(context, idx, self._write(context, idx, reply, _stream_of(batch[idx])))
                          for idx, reply in enumerate(replies)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.SUBMIT_THREADS, thread_name_prefix="loraplex-submit")
            if is_management_describe(data, context):
                output = [await loop.run_in_executor(self._pool, self.describe_handle)]
            else:
                batch = _raw_requests(data, context)
                outputs = await asyncio.gather(*(self._serve_one(context, idx, raw, loop) for idx, raw in enumerate(batch)))
                output = [self._release_job(context, idx, out) for idx, out in enumerate(outputs)]
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    async def _serve_one(self, context, idx: int, raw: RawRequest, loop) -> str:
        """One request of a message: its reply, or its chunks then its last chunk. Never raises."""
        try:
            got = await loop.run_in_executor(self._pool, self.service.submit, raw, loop)
        except Exception as exc:  # a bug outside the service's per-request guards: 500, the worker lives
            log.exception("submit failed")
            return self._write(context, idx, Reply.error(exc), None)
        if isinstance(got, Reply):
            return self._write(context, idx, got, None)
        ticket = got
        stream = stream_for(ticket.exchange) if ticket.stream else None
        try:
            while True:
                event = await ticket.next()
                if isinstance(event, Finished):
                    return self._write(context, idx, event.reply, stream)
                chunk = stream.piece(event.text, event.logprobs) if stream is not None else None
                if chunk is not None:
                    context.set_response_content_type(idx, stream.content_type)
                    send_intermediate_predict_response({idx: chunk}, {idx: context.request_ids[idx]},
                                                       "Intermediate Prediction success", 200, context)
        except BaseException as exc:
            ticket.cancel()  # its row is freed at the scheduler's next step
            if not isinstance(exc, Exception):  # the loop is shutting down: let it
                raise
            log.exception("streaming a reply failed")
            return self._write(context, idx, Reply.error(exc), stream)

    @staticmethod
    def _release_job(context, idx: int, body: str) -> str:
        """Request idx's final message body, after making sure the frontend will forget the job.

        TorchServe 0.12's asynchronous frontend (`AsyncBatchAggregator.sendResponse`) drops a job from
        its in-backend map only at a reply whose ``ts_stream_next`` header is ``false``, and
        `create_predict_response` writes ``false`` only for a request that already had an
        intermediate message (``true``). A reply sent whole as the final message has no such header:
        the frontend answers the client but keeps the job (its request payload included) for the
        server's lifetime, so the map grows by one per non-streamed request, and a lookup racing
        the growing map's resize (a plain LinkedHashMap that the frontend's worker thread and its
        netty thread share) finds no job and makes the frontend restart the worker.

        So a request that had no intermediate message is closed here:
        - status below 400: its whole body (status, headers and content type as set) goes out as
          one intermediate message, and the final message is empty: the client gets the same
          status, headers and body, sent chunked, exactly as a one-chunk stream;
        - an error: the frontend closes the connection right after an error's head, so it cannot be
          chunked; the error goes out whole first (no ``ts_stream_next``: an ordinary response),
          and the final message, marked ``false``, only closes the job (its empty writes go to the
          closed connection).
        Inference requests only: a describe job takes one reply."""
        if context.get_response_headers(idx).get("ts_stream_next") == "true":
            return body  # streamed: the final message (marked false by TorchServe) closes the job
        status = context.get_response_status(idx)[0] or 200
        if status < 400:
            send_intermediate_predict_response({idx: body}, {idx: context.request_ids[idx]},
                                               "Intermediate Prediction success", 200, context)
        else:
            context.cl_socket.sendall(create_predict_response({idx: body}, {idx: context.request_ids[idx]},
                                                              "Prediction success", 200, context))
            context.set_response_header(idx, "ts_stream_next", "false")
        return ""

    def _serialise_sends(self, context) -> None:
        """Make every `sendall` on TorchServe's socket whole (see the module docstring). Called on the
        first asynchronous `handle`, before any response can have been written."""
        if self._sends_serialised:
            return
        self._sends_serialised = True
        sock = getattr(context, "cl_socket", None)
        if type(sock) is socket.socket:
            sock.__class__ = self.SerialSendSocket
        else:
            log.warning("TorchServe's socket is a %s, not a socket.socket: chunks and replies written by two "
                        "threads are not serialised", type(sock).__name__)

    class SerialSendSocket(socket.socket):
        """TorchServe's worker socket with one lock around `sendall` (nested: TorchServe refuses an
        entry module defining two classes). No new slots: an existing socket's class can be switched."""

        __slots__ = ()
        _send_lock = threading.Lock()  # one socket per worker process

        def sendall(self, data, flags=0):
            with self._send_lock:
                return super().sendall(data, flags)

    # -- both modes ---------------------------------------------------------------------------

    def _serve_batch(self, batch: list[RawRequest]) -> list[Reply]:
        try:
            return self.service.handle_batch(batch)
        except Exception as exc:  # a bug outside the per-request guards: 500 for each, the worker lives
            log.exception("handle_batch failed for a batch of %d requests", len(batch))
            return [Reply.error(exc)] * len(batch)

    @staticmethod
    def _write(context, idx: int, reply: Reply, stream: ChunkStream | None) -> str:
        """Request idx's (last) output, with its status, headers and content type set on the context.
        A streamed request: once a chunk went out (status 200 sent) or when it succeeded, the stream's
        end; a stream that failed before its first chunk gets the ordinary error reply."""
        if stream is not None and (stream.started or reply.status == 200):
            context.set_response_content_type(idx, stream.content_type)
            return stream.finish(reply.status, reply.body)
        if reply.status != 200:
            context.set_response_status(reply.status, reply.phrase, idx)
        for name, value in reply.headers.items():
            context.set_response_header(idx, name, value)
        context.set_response_content_type(idx, "application/json")  # else the frontend sends none
        return json.dumps(reply.body)

    class TorchServeMetrics:
        """handler/metrics.py's values through TorchServe's metrics cache (worker thread; nested
        because TorchServe refuses an entry module defining two classes): each update
        is a `[METRICS]` log line that the frontend turns into a Prometheus series on its metrics
        endpoint (`metrics_mode=prometheus`; the metric must be in the `metrics_config` yaml, where
        handler/metrics.py's `metrics_yaml()` names them). A metric the yaml lacks is declared here
        (the frontend then drops its lines: `ts_metrics.yaml` must be the file it reads)."""

        def __init__(self, cache) -> None:
            self._cache = cache
            self._metrics = {}
            for m in TS_METRICS:
                kind = MetricTypes(m.kind)
                try:
                    self._metrics[m.name] = cache.get_metric(m.name, kind)
                except Exception:
                    log.warning("metric %s is not in TorchServe's metrics_config; its series will not show", m.name)
                    self._metrics[m.name] = cache.add_metric_to_cache(m.name, m.unit, list(m.labels), kind)

        def record(self, metric: MetricDef, value: float, labels) -> None:
            handle = self._metrics.get(metric.name)
            if handle is not None:
                handle.add_or_update(value, list(labels))


def is_management_describe(data, context) -> bool:
    """True only for TorchServe's management describe: one request carrying `describe: True`, no
    input and no `explain` header (the frontend puts `explain` on every REST inference request,
    whatever the client sent; gRPC requests pass no client headers at all)."""
    if len(data) != 1 or data[0]:
        return False
    headers = context.get_all_request_header(0) or {}
    return headers.get("describe") == "True" and "explain" not in headers and "url_path" not in headers


def _raw_requests(data, context) -> list[RawRequest]:
    return [RawRequest(_body(item), context.get_all_request_header(idx) or {}) for idx, item in enumerate(data)]


def _stream_of(raw: RawRequest) -> ChunkStream | None:
    """Synchronous replies: the stream format a request asked for, from its own parse (pure; a request
    that does not parse gets its error reply, not a stream)."""
    try:
        return stream_for(route_for(raw.headers).parse(raw.body, raw.headers))
    except Exception:
        return None


def _body(item):
    """TorchServe puts the payload under 'body' or 'data'; JSON arrives decoded, text as str, rest as
    bytes. A form-encoded post has neither (its fields become parameters): treated as no body."""
    if isinstance(item, dict):
        for key in ("body", "data"):
            if item.get(key) is not None:
                return item[key]
        return None
    return item
