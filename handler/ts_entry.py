"""TorchServe entry point: the only module of loraplex that imports `ts`.

The archive copies this file to the top of the model dir and TorchServe imports
it as a top-level module, so it uses absolute imports of the installed
`handler` package (never relative ones).

TorchServe's contract (ts/torch_handler/base_handler.py): `initialize(context)`
once per worker process, then `handle(data, context)` for each batch the
frontend assembles, sequentially, returning one output per request (any other
count fails the whole batch with TorchServe's 503, so `handle` never raises and
always returns one output per request).

Every request in a batch gets its own status through
`context.set_response_status(code, phrase, idx)`, so a bad request fails alone.

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

import json
import logging
import time
from pathlib import Path

from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from loraplex_common.config import LoraplexConfig

from handler.metrics import TS_METRICS, EppEndpoint, MetricDef
from handler.service import LoraplexService, RawRequest, Reply

log = logging.getLogger(__name__)


class LoraplexHandler(BaseHandler):
    def __init__(self) -> None:
        super().__init__()
        self.service: LoraplexService | None = None

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props.get("model_dir"))
        # TorchServe has parsed model-config.yaml already; its `handler:` section sits below env
        # LORAPLEX_* in the one precedence order.
        section = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
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
        self.context = context
        self.initialized = True
        log.info("loraplex worker ready in %.1fs (engine=%s, num_slots=%d, resident_adapters=%d)",
                 time.monotonic() - start, config.engine, config.num_slots, config.resident_adapters)

    def handle(self, data, context):
        self.context = context
        start = time.time()
        if is_management_describe(data, context):
            output = [self.describe_handle()]
        else:
            batch = [RawRequest(_body(item), context.get_all_request_header(idx) or {})
                     for idx, item in enumerate(data)]
            try:
                replies = self.service.handle_batch(batch)
            except Exception as exc:  # a bug outside the per-request guards: 500 for each, the worker lives
                log.exception("handle_batch failed for a batch of %d requests", len(batch))
                replies = [Reply.error(exc)] * len(batch)
            output = []
            for idx, reply in enumerate(replies):
                if reply.status != 200:
                    context.set_response_status(reply.status, reply.phrase, idx)
                context.set_response_content_type(idx, "application/json")  # else the frontend sends none
                output.append(json.dumps(reply.body))
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    def describe_handle(self):
        return json.dumps(self.service.describe())

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


def _body(item):
    """TorchServe puts the payload under 'body' or 'data'; JSON arrives decoded, text as str, rest as
    bytes. A form-encoded post has neither (its fields become parameters): treated as no body."""
    if isinstance(item, dict):
        for key in ("body", "data"):
            if item.get(key) is not None:
                return item[key]
        return None
    return item
