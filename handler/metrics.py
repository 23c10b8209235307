"""The worker's Prometheus metrics: names, label sets, the cardinality cap, in one place.

Two ways out (README "Metrics"):
- TorchServe's metrics endpoint (`metrics_address`, `metrics_mode=prometheus`): every metric below
  but the LoRA gauge. The worker logs `[METRICS]` lines through TorchServe's metrics cache and the
  frontend turns them into Prometheus series; a metric must be declared in the `metrics_config`
  yaml the frontend reads at start (`metrics_yaml()` writes that file's model part; the shipped
  `ts_metrics.yaml` is checked against it by a test).
- the worker's own endpoint (`epp_metrics_address`, off by default): the endpoint picker's set,
  LORA_INFO with RUNNING, WAITING and KV_CACHE beside it so the picker scrapes one port.
  LORA_INFO cannot pass through TorchServe 0.12: its frontend splits a metric line's labels on
  "," and each label on ":" and silently drops a piece that does not split in two, so a
  comma-separated adapter list loses all but its first name (and the update then fails for a
  missing label).

Label values through TorchServe must not contain "," ":" "|" and must not be empty (dropped the
same way): tenant ids (`^[a-z0-9][a-z0-9_-]{0,62}$`) and `v<N>` qualify, and the stand-ins below
("_none", "_base", "_other", "none") were chosen to; so do task names (`^[a-z0-9][a-z0-9_-]{0,31}$`).

Cardinality: the first `metrics_max_adapters` distinct (tenant, version) pairs a worker records
keep their own labels; every later pair is recorded as tenant=version="_other" (TorchServe never
removes a series, so the cap bounds the endpoint for the worker's lifetime).

Concurrency: every recording call runs on the thread that owns the engine, one at a time
(static: the worker thread, TorchServe's `handle` → `LoraplexService.handle_batch` → the residency;
continuous: the scheduler thread). The own endpoint's HTTP thread (prometheus_client) only reads
its registry.

Rate: each update through TorchServe is a log line, so the continuous scheduler's per-step gauges
(`scheduler_step`) go out at most every GAUGE_INTERVAL_S, at once when the worker goes idle or busy,
and within NAMES_INTERVAL_S when the LoRA gauge's adapter lists change, so the endpoint picker sees
a waiting adapter while it waits;
the per-row histograms are one value per row (TTFT, mean inter-token latency), not one per token.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
ADAPTER_LABELS = ("tenant", "task", "version")
NO_TENANT, BASE_VERSION, OTHER, NO_TASK = "_none", "_base", "_other", "none"
EMPTY_LIST = " "  # an empty adapter list: TorchServe drops an empty label; the picker trims it to nothing
GAUGE_INTERVAL_S = 1.0  # the most often the continuous scheduler's row counts and KV use are sent
NAMES_INTERVAL_S = 0.05  # the most often a change of the LoRA gauge's adapter lists is sent


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # COUNTER | GAUGE | HISTOGRAM
    unit: str
    labels: tuple[str, ...]
    help: str


REQUESTS = MetricDef("loraplex_adapter_requests_total", COUNTER, "count", ADAPTER_LABELS,
                     "requests answered with 200, per adapter (base-model rows: version _base)")
GENERATED_TOKENS = MetricDef("loraplex_adapter_generated_tokens_total", COUNTER, "count", ADAPTER_LABELS,
                             "completion tokens returned, per adapter")
LOADS = MetricDef("loraplex_adapter_loads_total", COUNTER, "count", ADAPTER_LABELS + ("source",),
                  "adapter loads into a device slot, by source (store | host)")
LOAD_SECONDS = MetricDef("loraplex_adapter_load_seconds", HISTOGRAM, "seconds", ADAPTER_LABELS,
                         "time of one adapter load (read or host copy, then the engine's copy)")
EVICTIONS = MetricDef("loraplex_adapter_evictions_total", COUNTER, "count", ADAPTER_LABELS + ("reason",),
                      "adapters dropped from a device slot, by reason (lru | idle | stale | pinned)")
FALLBACKS = MetricDef("loraplex_adapter_fallbacks_total", COUNTER, "count", ADAPTER_LABELS + ("reason",),
                      "tenant requests served by the base model, by reason")
TTFT_SECONDS = MetricDef("loraplex_adapter_time_to_first_token_seconds", HISTOGRAM, "seconds", ADAPTER_LABELS,
                         "continuous: arrival to the first token; static (no streaming): the time to the whole reply")
ITL_SECONDS = MetricDef("loraplex_adapter_inter_token_latency_seconds", HISTOGRAM, "seconds", ADAPTER_LABELS,
                        "continuous: a row's mean time between tokens; static: the engine call's time / its tokens")
RUNNING = MetricDef("loraplex_num_requests_running", GAUGE, "count", (),
                    "continuous: rows in the engine's KV rows; static: rows of the engine call being served")
WAITING = MetricDef("loraplex_num_requests_waiting", GAUGE, "count", (),
                    "continuous: requests waiting for a KV row; static: rows of the batch waiting for a later wave")
KV_CACHE = MetricDef("loraplex_kv_cache_usage_perc", GAUGE, "percent", (),
                     "continuous: the fraction of KV cache tokens held (0..1); static: always 0 (allocated per call)")
RESIDENT = MetricDef("loraplex_resident_adapters", GAUGE, "count", (), "adapters in the device slots")
HOST_TIER = MetricDef("loraplex_host_tier_adapters", GAUGE, "count", (), "adapters held in the host-memory tier")
LORA_INFO = MetricDef("loraplex_lora_requests_info", GAUGE, "timestamp",
                      ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
                      "the endpoint picker's LoRA gauge (vllm:lora_requests_info's form); value: Unix time")

TS_METRICS: tuple[MetricDef, ...] = (REQUESTS, GENERATED_TOKENS, LOADS, LOAD_SECONDS, EVICTIONS, FALLBACKS,
                                     TTFT_SECONDS, ITL_SECONDS, RUNNING, WAITING, KV_CACHE, RESIDENT, HOST_TIER)
EPP_METRICS: tuple[MetricDef, ...] = (LORA_INFO, RUNNING, WAITING, KV_CACHE)


class MetricsSink(Protocol):
    """Where a recorded value goes (ts_entry's TorchServe sink, the own endpoint, a test's list)."""

    def record(self, metric: MetricDef, value: float, labels: Sequence[str]) -> None: ...


class NullSink:
    def record(self, metric: MetricDef, value: float, labels: Sequence[str]) -> None:
        pass


def metrics_yaml() -> dict:
    """The `model_metrics` section TorchServe's frontend must know (yaml: metrics_config)."""
    out: dict[str, list] = {}
    for m in TS_METRICS:
        out.setdefault(m.kind, []).append({"name": m.name, "unit": m.unit, "dimensions": list(m.labels)})
    return out


class WorkerMetrics:
    """What the service and the residency record (worker thread only, see the module doc)."""

    def __init__(self, sinks: Sequence[MetricsSink] = (), *, max_adapters: int = 100, max_lora: int = 1,
                 wall_clock=time.time) -> None:
        self.sinks = list(sinks)
        self.max_adapters = max(1, max_adapters)
        self.max_lora = max_lora
        self._labelled: set[tuple[str, str, str]] = set()
        self._wall = wall_clock
        self._gauges_at = float("-inf")  # monotonic time of the last scheduler_step sent
        self._gauges_last: tuple | None = None

    def adapter_labels(self, tenant: str | None, version: int | None,
                       task: str | None = None) -> tuple[str, str, str]:
        """(tenant, task, version) under the cap: the record's task ("none" for a base-model row)."""
        key = (tenant or NO_TENANT, task or NO_TASK, f"v{version}" if version is not None else BASE_VERSION)
        if key not in self._labelled:
            if len(self._labelled) >= self.max_adapters:
                return OTHER, NO_TASK, OTHER
            self._labelled.add(key)
        return key

    def _emit(self, metric: MetricDef, value: float, labels: Sequence[str] = ()) -> None:
        for sink in self.sinks:
            try:
                sink.record(metric, value, labels)
            except Exception:  # a metric never fails a request
                log.exception("metric %s not recorded", metric.name)

    # -- per adapter ---------------------------------------------------------------

    def served(self, tenant: str | None, version: int | None, tokens: int, engine_s: float, reply_s: float,
               *, task: str | None = None) -> None:
        labels = self.adapter_labels(tenant, version, task)
        self._emit(REQUESTS, 1, labels)
        self._emit(GENERATED_TOKENS, tokens, labels)
        self._emit(TTFT_SECONDS, reply_s, labels)
        if tokens > 0:
            self._emit(ITL_SECONDS, engine_s / tokens, labels)

    def streamed(self, tenant: str | None, version: int | None, tokens: int, ttft_s: float,
                 itl_s: float | None, *, task: str | None = None) -> None:
        """Continuous: one row answered; arrival to first token, and its mean inter-token time."""
        labels = self.adapter_labels(tenant, version, task)
        self._emit(REQUESTS, 1, labels)
        self._emit(GENERATED_TOKENS, tokens, labels)
        self._emit(TTFT_SECONDS, ttft_s, labels)
        if itl_s is not None:
            self._emit(ITL_SECONDS, itl_s, labels)

    def fallback(self, tenant: str | None, version: int | None, reason: str, *, task: str | None = None) -> None:
        self._emit(FALLBACKS, 1, (*self.adapter_labels(tenant, version, task), reason))

    def loaded(self, tenant: str, version: int, source: str, seconds: float, *, task: str | None = None) -> None:
        labels = self.adapter_labels(tenant, version, task)
        self._emit(LOADS, 1, (*labels, source))
        self._emit(LOAD_SECONDS, seconds, labels)

    def evicted(self, tenant: str, version: int, reason: str, *, task: str | None = None) -> None:
        self._emit(EVICTIONS, 1, (*self.adapter_labels(tenant, version, task), reason))

    # -- per worker ----------------------------------------------------------------

    def wave(self, running_rows: int, waiting_rows: int, running: Sequence[str], waiting: Sequence[str]) -> None:
        """At the start of each engine call: its rows and adapter names, and what waits after it."""
        self._emit(RUNNING, running_rows)
        self._emit(WAITING, waiting_rows)
        self._emit(KV_CACHE, 0.0)
        self._emit(LORA_INFO, self._wall(), (str(self.max_lora), _names(running), _names(waiting)))

    def scheduler_step(self, running_rows: int, waiting_rows: int, kv_utilisation: float,
                       running: Sequence[str], waiting: Sequence[str], now: float | None = None) -> bool:
        """Continuous, after each step: rows running and waiting, KV use, and the LoRA gauge's lists
        (`running`: the tenants whose adapters are loaded and ready, `waiting`: the tenants of waiting
        rows). Sent when something changed: at once when the worker went idle or busy, at most every
        NAMES_INTERVAL_S when a list changed, else at most every GAUGE_INTERVAL_S; True when sent."""
        now = time.monotonic() if now is None else now
        values = (running_rows, waiting_rows, round(kv_utilisation, 4), tuple(dict.fromkeys(running)),
                  tuple(dict.fromkeys(waiting)))
        last = self._gauges_last
        idle = running_rows == 0 and waiting_rows == 0
        was_idle = last is None or (last[0] == 0 and last[1] == 0)
        if values == last:
            return False
        if idle == was_idle:  # going idle or busy is sent at once; otherwise rate-limited
            lists_changed = last is None or values[3:] != last[3:]
            if now - self._gauges_at < (NAMES_INTERVAL_S if lists_changed else GAUGE_INTERVAL_S):
                return False
        self._gauges_at, self._gauges_last = now, values
        self._emit(RUNNING, running_rows)
        self._emit(WAITING, waiting_rows)
        self._emit(KV_CACHE, kv_utilisation)
        self._emit(LORA_INFO, self._wall(), (str(self.max_lora), _names(running), _names(waiting)))
        return True

    def tiers(self, resident: int, host_tier: int) -> None:
        self._emit(RESIDENT, resident)
        self._emit(HOST_TIER, host_tier)


def _names(names: Sequence[str]) -> str:
    return ",".join(dict.fromkeys(names)) or EMPTY_LIST


class EppEndpoint:
    """The worker's own Prometheus endpoint for EPP_METRICS (prometheus_client, its own HTTP
    thread). Like vLLM's gauge, each (max_lora, running, waiting) combination is a series whose
    value is the time it was last set; the picker reads the series with the largest value. Only
    the newest LORA_INFO_SERIES combinations are kept (vLLM keeps every one)."""

    LORA_INFO_SERIES = 16

    def __init__(self, address: str) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        host, _, port = address.rpartition(":")
        self.registry = CollectorRegistry()
        self._gauges = {m.name: Gauge(m.name, m.help, list(m.labels), registry=self.registry) for m in EPP_METRICS}
        self._lora_series: list[tuple[str, ...]] = []  # oldest first
        self.server, self.thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0",
                                                     registry=self.registry)

    def record(self, metric: MetricDef, value: float, labels: Sequence[str]) -> None:
        gauge = self._gauges.get(metric.name)
        if gauge is None:
            return
        if metric is not LORA_INFO:
            gauge.set(value)
            return
        key = tuple("" if v == EMPTY_LIST else v for v in labels)
        if key in self._lora_series:
            self._lora_series.remove(key)
        self._lora_series.append(key)
        gauge.labels(*key).set(value)
        while len(self._lora_series) > self.LORA_INFO_SERIES:
            gauge.remove(*self._lora_series.pop(0))

    def close(self) -> None:
        self.server.shutdown()
