"""The serving benchmark's workload and drivers (CLI: bench/serve_bench.py; smoke test:
tests/test_serve_bench_smoke.py).

Workload (`make_workload`, pure and deterministic for a seed):

- open-loop Poisson arrivals: gaps ~ Exponential(rate); the gaps are drawn at rate 1 and
  divided by `rate`, so one seed gives the same requests at every rate of a sweep, only
  closer together;
- prompt and output lengths ~ lognormal(median, sigma) rounded and clipped to [low, high]
  (`LengthDist`): a long right tail, mean above the median. Prompt length is in words of a
  deterministic vocabulary (`single_token_words`: words the model's tokenizer encodes as one
  token each, so words ~ tokens); output length is `max_tokens` (a row may stop earlier at
  EOS; the run reports the tokens actually produced);
- tenants with Zipf popularity (`scaleout.zipf_workload`: tenant k drawn with weight
  1/(k+1)^s), more tenants than resident slots, so adapters are evicted and reloaded.

Drivers, each returning one `Outcome` per request with time stamps taken by the client:

- `drive_openai`: the official `openai` client (AsyncOpenAI, stream=True, temperature 0,
  max_retries=0) against TorchServe's OpenAI-compatible completions endpoint. TTFT = time
  to the first chunk with text, ITL = gaps between text chunks (a chunk may cover more than
  one token), e2e = until the stream ends. With `scheduler: static` the answer arrives as
  one text chunk (then the last chunk), so TTFT ~ e2e and there are no inter-token gaps.
- `drive_inprocess`: `LoraplexService` in this process. Continuous: what TorchServe's
  asynchronous worker does (handler/ts_entry.py): one asyncio loop, `service.submit(raw, loop)`
  on a pool of `SUBMIT_THREADS`, then `await ticket.next()` (time stamps per `TextDelta`; the
  scheduler hands a loop all its events once per iteration). Sequential runs (`open_loop=False`)
  use `Ticket.get()` on the calling thread. Static:
  a batcher thread that does what TorchServe's frontend does for a static archive (up to
  `batch_size` requests, waiting at most `max_batch_delay_ms` for a batch to fill) and
  calls `handle_batch`: TTFT = e2e there too.

`summarize` turns outcomes into the figures the issue names (nearest-rank percentiles).
`TorchServeStack` starts one private redis-server, onboards the tenants, and starts one
private TorchServe per scheduler from `archive.build_archive(..., scheduler=...)`.

Concurrency: `drive_openai` runs one asyncio loop (one task per request) on the calling
thread; `drive_inprocess` likewise (continuous; its submits on a small pool) or a batcher
thread (static), each request writing only its own `Outcome`; the service's own threads are the
service's business.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from .isolation import WORDS
from .scaleout import zipf_workload

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "serve"


# -- workload ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthDist:
    """round(median * exp(sigma * N(0, 1))) clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return int(min(self.high, max(self.low, round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))))))

    def __str__(self) -> str:
        return f"lognormal(median={self.median:g}, sigma={self.sigma:g}) clipped to [{self.low}, {self.high}]"


# Defaults of bench/serve_bench.py (stated in its --help and in bench/RESULTS.md "Serving").
PROMPT_WORDS = LengthDist(median=48, sigma=1.0, low=8, high=768)
OUTPUT_TOKENS = LengthDist(median=24, sigma=0.8, low=4, high=128)
# The smoke test's: short enough for the tiny model's 512 positions and a few seconds of CPU.
SMOKE_PROMPT_WORDS = LengthDist(median=12, sigma=0.8, low=3, high=48)
SMOKE_OUTPUT_TOKENS = LengthDist(median=6, sigma=0.6, low=2, high=16)


@dataclass(frozen=True)
class WorkloadSpec:
    requests: int
    rate: float  # mean arrivals per second (open loop)
    zipf_s: float = 1.1
    prompt: LengthDist = PROMPT_WORDS
    output: LengthDist = OUTPUT_TOKENS
    seed: int = 0

    def describe(self) -> dict:
        return {"requests": self.requests, "rate": self.rate, "zipf_s": self.zipf_s, "prompt_words": str(self.prompt),
                "output_tokens": str(self.output), "seed": self.seed, "arrivals": "Poisson (open loop)"}


@dataclass(frozen=True)
class ServeRequest:
    index: int
    arrival_s: float  # seconds after the run's start
    tenant: str
    prompt: str
    prompt_words: int
    max_tokens: int


def make_workload(spec: WorkloadSpec, tenants: Sequence[str], words: Sequence[str]) -> list[ServeRequest]:
    """`spec.requests` requests (module docstring). Separate random streams per field, so
    the prompts, lengths and tenants of a seed do not depend on the rate."""
    if spec.rate <= 0 or spec.requests < 1 or not tenants or not words:
        raise ValueError("need rate > 0, requests >= 1, tenants and words")
    arr, lens, text = (random.Random(f"{spec.seed}:{k}") for k in ("arrivals", "lengths", "text"))
    who = [t for t, _ in zipf_workload(tenants, [""], spec.requests, spec.zipf_s, spec.seed)]
    out, t = [], 0.0
    for i in range(spec.requests):
        t += arr.expovariate(1.0) / spec.rate
        n_words, n_out = spec.prompt.draw(lens), spec.output.draw(lens)
        prompt = " ".join(text.choice(words) for _ in range(n_words))
        out.append(ServeRequest(i, t if i else 0.0, who[i], prompt, n_words, n_out))
    return out


def retimed(work: Sequence[ServeRequest], rate_from: float, rate_to: float) -> list[ServeRequest]:
    """The same requests at another mean rate (arrival times scaled)."""
    from dataclasses import replace

    return [replace(r, arrival_s=r.arrival_s * rate_from / rate_to) for r in work]


def single_token_words(tokenizer: Any, candidates: Sequence[str] = WORDS, minimum: int = 8) -> list[str]:
    """The candidate words the tokenizer encodes as exactly one token after a space (so a
    prompt of n words is ~n tokens); all candidates when fewer than `minimum` qualify."""
    one = [w for w in dict.fromkeys(candidates)
           if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    return one if len(one) >= minimum else list(dict.fromkeys(candidates))


# -- outcomes and figures ----------------------------------------------------------------------

@dataclass
class Outcome:
    """One request as the client saw it (monotonic seconds; `first` None: no text arrived)."""

    request: ServeRequest
    status: int = 0  # HTTP status (or the Reply's); 0 = transport error
    text: str = ""
    tokens: int = 0  # output tokens (usage.completion_tokens, else counted)
    start: float = 0.0
    first: float | None = None
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk that carried text
    token_ids: tuple[int, ...] | None = None  # in-process only
    token_texts: tuple[str, ...] | None = None  # in-process only: each token id decoded alone
    top_logprobs: list[list[tuple[str, float]]] | None = None  # per token, when the request asked (in-process)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no data."""
    if not xs:
        return None
    v = sorted(xs)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 2)


def summarize(outcomes: Sequence[Outcome], *, scheduler: str, rate: float) -> dict:
    """The issue's per-run figures from the client's stamps (errors_5xx: status >= 500;
    wrong_outputs / evictions / graph_captures_after_warmup are filled in by the caller)."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.first - o.start for o in ok if o.first is not None]
    e2e = [o.end - o.start for o in ok]
    itl = [b - a for o in ok for a, b in zip(o.chunk_times, o.chunk_times[1:])]
    tokens = sum(o.tokens for o in ok)
    span = (max(o.end for o in outcomes) - min(o.start for o in outcomes)) if outcomes else 0.0
    return {
        "scheduler": scheduler, "rate": rate, "requests": len(outcomes),
        "output_tok_s": round(tokens / span, 3) if span > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)), "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "itl_p50_ms": _ms(percentile(itl, 50)), "itl_p99_ms": _ms(percentile(itl, 99)),
        "e2e_p50_ms": _ms(percentile(e2e, 50)), "e2e_p99_ms": _ms(percentile(e2e, 99)),
        "errors_5xx": sum(o.status >= 500 for o in outcomes),
        "wrong_outputs": None, "evictions": None, "graph_captures_after_warmup": None,
        # beyond the keys
        "ok": len(ok), "errors_4xx": sum(400 <= o.status < 500 for o in outcomes),
        "transport_errors": sum(o.status == 0 for o in outcomes),
        "stream_errors": sum(o.status == 200 and o.error is not None for o in outcomes),
        "output_tokens": tokens, "span_s": round(span, 3),
        "arrival_span_s": round(max(o.request.arrival_s for o in outcomes), 3) if outcomes else 0.0,
        "output_tokens_p50": percentile([o.tokens for o in ok], 50),
        "output_tokens_p99": percentile([o.tokens for o in ok], 99),
        "error_examples": [{"index": o.request.index, "status": o.status, "error": o.error}
                           for o in outcomes if not o.ok][:5],
    }


def check_sample(n_requests: int, at_least: int, seed: int) -> list[int]:
    """The request indices re-sent alone after a run (all of them when there are at most `at_least`)."""
    if n_requests <= at_least:
        return list(range(n_requests))
    return sorted(random.Random(f"{seed}:check").sample(range(n_requests), at_least))


def wrong_outputs(timed: Sequence[Outcome], alone: Sequence[Outcome], tie_tol: float | None = None,
                  ties: list[dict] | None = None) -> tuple[int, list[dict]]:
    """Requests whose answer in the timed run differs from the same request sent alone (text,
    and token ids where both have them). A request that failed either time counts as wrong.

    `tie_tol` (half-precision runs, where a row's logits depend on its batch mates' shapes by a
    rounding error): a greedy answer that leaves the alone answer at token d is still right when
    its token d is among the alone run's top log-probs at d (same context up to there) and at
    most `tie_tol` below the best: a near tie that rounding broke the other way (vLLM's
    `check_logprobs_close` accepts any top-k token there). Tokens after d are not compared (the
    contexts differ). Such requests go to `ties` (with the gap), not to the wrong ones."""
    by_index = {o.request.index: o for o in timed}
    bad = []
    for solo in alone:
        got = by_index[solo.request.index]
        same = got.ok and solo.ok and got.text == solo.text and (
            got.token_ids is None or solo.token_ids is None or got.token_ids == solo.token_ids)
        if same:
            continue
        gap = _divergence_gap(got, solo) if got.ok and solo.ok else None
        if tie_tol is not None and gap is not None and gap <= tie_tol:
            if ties is not None:
                ties.append({"index": solo.request.index, "gap": round(gap, 4)})
            continue
        bad.append({"index": solo.request.index, "tenant": solo.request.tenant, "timed": got.text[:80],
                    "alone": solo.text[:80], "status": [got.status, solo.status], "gap": gap})
    return len(bad), bad[:5]


def _divergence_gap(timed: Outcome, alone: Outcome) -> float | None:
    """How far below the alone run's best log-prob the timed run's token is at the first token where
    the two differ; None where that cannot be told (no log-probs, no such token, not in the top-k)."""
    a, b = timed.token_ids, alone.token_ids
    if a is None or b is None or timed.token_texts is None or not alone.top_logprobs:
        return None
    d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if d is None or d >= len(alone.top_logprobs) or d >= len(timed.token_texts) or not alone.top_logprobs[d]:
        return None
    top = alone.top_logprobs[d]
    mine = next((lp for text, lp in top if text == timed.token_texts[d]), None)
    return None if mine is None else max(0.0, top[0][1] - mine)


# -- driver (a): the openai client against TorchServe ------------------------------------------

def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


async def _openai_one(client: Any, req: ServeRequest, t0: float, loop: asyncio.AbstractEventLoop,
                      max_tokens: int | None = None) -> Outcome:
    import openai

    delay = t0 + req.arrival_s - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
    o = Outcome(req, start=time.monotonic())
    counted = 0
    usage = None
    try:
        stream = await client.completions.create(model=req.tenant, prompt=req.prompt,
                                                 max_tokens=max_tokens or req.max_tokens, temperature=0,
                                                 stream=True)
        o.status = 200
        async for chunk in stream:
            now = time.monotonic()
            piece = "".join(c.text or "" for c in (chunk.choices or []))
            if piece:
                o.chunk_times.append(now)
                if o.first is None:
                    o.first = now
                o.text += piece
                counted += 1
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage
    except openai.APIStatusError as exc:
        o.status, o.error = exc.status_code, _error_text(exc)
    except openai.APIConnectionError as exc:
        o.status, o.error = 0, _error_text(exc)
    except openai.APIError as exc:  # an error chunk after the stream started
        o.error = _error_text(exc)
    o.end = time.monotonic()
    o.tokens = int(usage.completion_tokens) if usage is not None else counted
    return o


def drive_openai(base_url: str, api_key: str, work: Sequence[ServeRequest], *, timeout: float = 900,
                 open_loop: bool = True, max_tokens: int | None = None) -> list[Outcome]:
    """Send `work` at its arrival times (open loop), or one at a time (`open_loop=False`: each
    request alone, in order); `max_tokens` overrides every request's."""
    import openai

    async def run() -> list[Outcome]:
        loop = asyncio.get_running_loop()
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout) as client:
            if not open_loop:
                return [await _openai_one(client, r, loop.time() - r.arrival_s, loop, max_tokens) for r in work]
            t0 = loop.time()
            return list(await asyncio.gather(*(_openai_one(client, r, t0, loop, max_tokens) for r in work)))

    return asyncio.run(run())


# -- driver (b): LoraplexService in this process ------------------------------------------------

def _raw(req: ServeRequest, max_tokens: int | None = None, logprobs: int = 0) -> Any:
    from handler.service import RawRequest

    body: dict[str, Any] = {"prompt": req.prompt, "max_new_tokens": max_tokens or req.max_tokens}
    if logprobs:
        body["logprobs"] = logprobs
    return RawRequest(body, {"X-Tenant-ID": req.tenant})


def _fill_from_reply(o: Outcome, reply: Any) -> None:
    o.status = int(reply.status)
    body = reply.body if isinstance(reply.body, dict) else {}
    if o.status == 200:
        o.text = str(body.get("text", ""))
        usage = body.get("usage") or {}
        o.tokens = int(usage.get("completion_tokens", o.tokens))
    else:
        o.error = str(body.get("error", body))[:300]


def _submit_one(service: Any, req: ServeRequest, max_tokens: int | None, event_timeout: float,
                logprobs: int = 0) -> Outcome:
    """One request on the calling thread: `submit`, then `Ticket.get` until Finished."""
    o = Outcome(req, start=time.monotonic())
    try:
        got = service.submit(_raw(req, max_tokens, logprobs))
        if not hasattr(got, "get"):  # an immediate Reply (an error, 413, 503)
            _fill_from_reply(o, got)
        else:
            events = _Events(o, service)
            while not events.take(got.get(timeout=event_timeout)):
                pass
    except Exception as exc:  # the driver's own failure: recorded, never raised into the run
        o.status, o.error = 0, _error_text(exc)
    o.end = time.monotonic()
    return o


async def _submit_async(service: Any, req: ServeRequest, max_tokens: int | None, event_timeout: float,
                        pool: Any) -> Outcome:
    """One request the way TorchServe's asynchronous worker serves it (handler/ts_entry.py): `submit`
    on a small thread pool with the running event loop, then `await ticket.next()` on the loop."""
    loop = asyncio.get_running_loop()
    o = Outcome(req, start=time.monotonic())
    try:
        got = await loop.run_in_executor(pool, service.submit, _raw(req, max_tokens), loop)
        if not hasattr(got, "next"):  # an immediate Reply
            _fill_from_reply(o, got)
        else:
            events = _Events(o, service)
            while not events.take(await asyncio.wait_for(got.next(), event_timeout)):
                pass
    except Exception as exc:
        o.status, o.error = 0, _error_text(exc)
    o.end = time.monotonic()
    return o


class _Events:
    """A ticket's events into its `Outcome` (time stamps per `TextDelta`, the reply at Finished)."""

    def __init__(self, o: Outcome, service: Any) -> None:
        self.o, self.service = o, service
        self.ids: list[int] = []
        self.top: list[list[tuple[str, float]]] = []

    def take(self, ev: Any) -> bool:
        """True at Finished."""
        from handler.scheduler import Finished, TextDelta

        o, now = self.o, time.monotonic()
        if isinstance(ev, TextDelta):
            self.ids.extend(ev.token_ids)
            if ev.logprobs:
                self.top.extend([(e["token"], float(e["logprob"])) for e in step] for step in ev.logprobs["top_logprobs"])
            if ev.token_ids or ev.text:
                o.chunk_times.append(now)
                if o.first is None:
                    o.first = now
            return False
        if isinstance(ev, Finished):
            _fill_from_reply(o, ev.reply)
            o.token_ids = tuple(self.ids)
            o.token_texts = tuple(self.service.token_text(i) for i in self.ids)
            o.top_logprobs = self.top or None
            o.tokens = o.tokens or len(self.ids)
            return True
        return False


SUBMIT_THREADS = 4  # as ts_entry's LoraplexHandler.SUBMIT_THREADS


async def _open_loop_async(service: Any, work: Sequence[ServeRequest], max_tokens: int | None,
                           event_timeout: float) -> list[Outcome]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="bench-submit") as pool:
        t0 = time.monotonic()
        tasks = []
        for r in work:
            delay = t0 + r.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_submit_async(service, r, max_tokens, event_timeout, pool)))
        return list(await asyncio.gather(*tasks))


def drive_inprocess(service: Any, work: Sequence[ServeRequest], *, scheduler: str, open_loop: bool = True,
                    max_tokens: int | None = None, batch_size: int = 8, max_batch_delay_ms: float = 20,
                    event_timeout: float = 600, logprobs: int = 0) -> list[Outcome]:
    """Module docstring. `open_loop=False`: each request alone, one after the other (continuous:
    asking for `logprobs` top log-probs per token, which `wrong_outputs` can use)."""
    if not open_loop:
        if scheduler == "continuous":
            return [_submit_one(service, r, max_tokens, event_timeout, logprobs) for r in work]
        return [_static_batch(service, [r], max_tokens)[0] for r in work]
    if scheduler == "continuous":
        return asyncio.run(_open_loop_async(service, work, max_tokens, event_timeout))
    outcomes: list[Outcome | None] = [None] * len(work)
    t0 = time.monotonic()
    arrived: "queue.Queue[tuple[int, float] | None]" = queue.Queue()

    def batcher() -> None:  # what TorchServe's frontend does for a static archive
        done = False
        while not done:
            first = arrived.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + max_batch_delay_ms / 1000
            while len(batch) < batch_size:
                try:
                    nxt = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    done = True
                    break
                batch.append(nxt)
            for (i, start), o in zip(batch, _static_batch(service, [work[i] for i, _ in batch], max_tokens)):
                o.start = start
                outcomes[i] = o

    th = threading.Thread(target=batcher, daemon=True)
    th.start()
    for i, r in enumerate(work):
        delay = t0 + r.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        arrived.put((i, time.monotonic()))
    arrived.put(None)
    th.join()
    return [o for o in outcomes if o is not None]


def _static_batch(service: Any, reqs: Sequence[ServeRequest], max_tokens: int | None) -> list[Outcome]:
    start = time.monotonic()
    replies = service.handle_batch([_raw(r, max_tokens) for r in reqs])
    end = time.monotonic()
    out = []
    for r, reply in zip(reqs, replies):
        o = Outcome(r, start=start, end=end, first=end, chunk_times=[end])
        _fill_from_reply(o, reply)
        out.append(o)
    return out


# -- counters from a worker's describe -----------------------------------------------------------

def evictions(counters: dict) -> int:
    """Every eviction the residency counted, whatever its reason (`evictions_<reason>`)."""
    return sum(int(v) for k, v in counters.items() if k.startswith("evictions_") and isinstance(v, (int, float)))


def captures_after_warmup(describe: dict) -> int | None:
    """Graph captures since warm-up, as the worker reports them (None where it reports none)."""
    sched = describe.get("scheduler") or {}
    if sched.get("captures_after_warmup") is not None:
        return int(sched["captures_after_warmup"])
    dec = describe.get("decode") or {}
    return int(dec["captures_after_warmup"]) if dec.get("captures_after_warmup") is not None else None


# -- the TorchServe stack ----------------------------------------------------------------------

def known_handler_keys() -> set[str]:
    from loraplex_common.config import LoraplexConfig

    return {f.name for f in fields(LoraplexConfig)}


def onboard_adapters(adapters: dict[str, Path], model_dir: Path, *, redis_url: str, store: Path,
                     prefix: str = PREFIX, spec: Any = None) -> None:
    """Onboard each adapter as the tenant of its name (what `tenantctl onboard` does)."""
    from loraplex_common.config import LoraplexConfig
    from tenant_registry.onboarding import onboard
    from tenant_registry.registry import TenantRegistry
    from tenant_registry.store import AdapterStore
    from tenant_registry.validate import BaseModelSpec

    settings = LoraplexConfig.from_mapping({"redis_url": redis_url, "redis_prefix": prefix,
                                            "adapter_store": str(store), "base_model_name": ""})
    registry = TenantRegistry(redis_url, prefix)
    spec = spec or BaseModelSpec.from_model_dir(model_dir)
    for name, path in adapters.items():
        onboard(registry, AdapterStore(Path(store)), spec, name, path, settings)


class TorchServeStack:
    """One private redis-server with the tenants onboarded, one private TorchServe per
    scheduler, each from its own archive (`build_archive(..., scheduler=...)`); started
    together, stopped together (nothing is left running when `start` fails)."""

    def __init__(self, workdir: Path, model_dir: Path, adapters: dict[str, Path], schedulers: Sequence[str], *,
                 handler: dict, threads: int = 1) -> None:
        self.workdir = Path(workdir).resolve()
        self.model_dir = Path(model_dir)
        self.adapters = adapters
        self.schedulers = list(schedulers)
        self.handler = handler
        self.threads = threads
        self.redis: Any = None
        self.instances: dict[str, Any] = {}
        self.notes: list[str] = []

    def _archive(self, scheduler: str) -> Path:
        import yaml

        from .archive import build_archive

        cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
        known = known_handler_keys()
        cfg["handler"].update({k: v for k, v in self.handler.items() if k in known})
        dropped = sorted(set(self.handler) - known)
        if dropped:
            self.notes.append(f"handler keys not known to this build, left out: {dropped}")
        path = self.workdir / f"model-config-{scheduler}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        store = self.workdir / f"model_store-{scheduler}"
        if "scheduler" in inspect.signature(build_archive).parameters:
            build_archive(self.model_dir, store, config_file=path, scheduler=scheduler)
        else:
            self.notes.append(f"build_archive has no scheduler= here: {scheduler!r} built with the default config")
            build_archive(self.model_dir, store, config_file=path)
        return store

    def start(self, timeout: float = 300) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from .services import RedisServer, TorchServe, free_port

        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            stores = {s: self._archive(s) for s in self.schedulers}
            self.redis = RedisServer(free_port(), self.workdir / "redis")
            self.redis.start()
            adapters_store = self.workdir / "adapters"
            onboard_adapters(self.adapters, self.model_dir, redis_url=self.redis.url, store=adapters_store)
            env = {"LORAPLEX_REDIS_URL": self.redis.url, "LORAPLEX_ADAPTER_STORE": str(adapters_store),
                   "LORAPLEX_REDIS_PREFIX": PREFIX, "OMP_NUM_THREADS": str(self.threads)}
            self.instances = {s: TorchServe(self.workdir / f"ts-{s}", stores[s], env=env) for s in self.schedulers}
            with ThreadPoolExecutor(len(self.instances)) as pool:
                for job in [pool.submit(ts.start, timeout) for ts in self.instances.values()]:
                    job.result()
        except BaseException:
            self.stop()
            raise

    def base_url(self, scheduler: str) -> str:
        ts = self.instances[scheduler]
        return f"{ts.inference_url}/predictions/{ts.model_name}/1.0/v1"

    def token(self, scheduler: str) -> str:
        return self.instances[scheduler].keys()["inference"]["key"]

    def describe(self, scheduler: str) -> dict:
        import json

        meta = self.instances[scheduler].describe()[0]["customizedMetadata"]
        return json.loads(meta) if isinstance(meta, str) else meta

    def stop(self) -> None:
        for ts in self.instances.values():
            ts.stop()
        if self.redis is not None:
            self.redis.stop()


def timed_phase(send: Callable[[Sequence[ServeRequest], bool, int | None], list[Outcome]],
                describe: Callable[[], dict], work: Sequence[ServeRequest], *, scheduler: str, rate: float,
                check: int, seed: int, tie_tol: float | None = None) -> tuple[dict, list[Outcome]]:
    """One scheduler's run: the timed open-loop run, the describe counters around it, then the
    checked sample re-sent one at a time (`send(work, open_loop, max_tokens)`); `tie_tol` as
    `wrong_outputs` (`near_ties` counts the answers it accepted, with their gaps)."""
    before = describe()
    outcomes = send(work, True, None)
    after = describe()
    res = summarize(outcomes, scheduler=scheduler, rate=rate)
    picked = [work[i] for i in check_sample(len(work), check, seed)]
    alone = send(picked, False, None)
    ties: list[dict] = []
    n_wrong, examples = wrong_outputs(outcomes, alone, tie_tol, ties)
    res.update({"wrong_outputs": n_wrong, "checked": len(picked), "wrong_examples": examples,
                "near_ties": len(ties), "near_tie_gaps": sorted(t["gap"] for t in ties), "tie_tol": tie_tol,
                "evictions": evictions(after.get("counters", {})) - evictions(before.get("counters", {})),
                "graph_captures_after_warmup": captures_after_warmup(after),
                "kernel_compiles_during_run": (int(after["kernel_variants"]) - int(before["kernel_variants"])
                                               if "kernel_variants" in after and "kernel_variants" in before else None),
                "load_thread_ms_during_run": describe_delta(before, after, "counters", "load_thread_ms"),
                **{f"{key}_during_run": describe_delta(before, after, "scheduler", "stepper", key)
                   for key in ("prefill_forwards", "prefill_replays", "decode_steps", "past_end", "mixed_steps",
                               "mixed_replays", "mixed_prompt_tokens")},
                "scheduler_thread_s_during_run": thread_time_delta(before, after),
                "free_rows_waiting_during_run": describe_delta(before, after, "scheduler", "free_rows_waiting"),
                "row_steps_during_run": {k: describe_delta(before, after, "scheduler", "stepper", "row_steps", k)
                                         for k in ("decoding", "joining", "ending", "free")},
                **{f"device_{phase}_s_during_run": _device_s(before, after, phase)
                   for phase in ("prefill", "decode", "mixed")}})
    device_s = [res[f"device_{phase}_s_during_run"] for phase in ("prefill", "decode", "mixed")]
    # the share of the timed span the GPU spent on the stepper's forwards (None: a CPU)
    res["device_busy"] = (round(sum(device_s) / res["span_s"], 3)
                          if None not in device_s and res.get("span_s") else None)
    return res, outcomes


def thread_time_delta(before: dict, after: dict) -> dict[str, float] | None:
    """Seconds of the scheduler thread per loop phase between two describes (`scheduler.ThreadTime`;
    None: a static worker)."""
    b = (before.get("scheduler") or {}).get("thread_s")
    a = (after.get("scheduler") or {}).get("thread_s")
    if not a or not b:
        return None
    return {k: round(a[k] - b.get(k, 0.0), 3) for k in a}


def _device_s(before: dict, after: dict, phase: str) -> float | None:
    """Seconds the GPU spent on the stepper's `phase` forwards between two describes (None: a CPU)."""
    ms = describe_delta(before, after, "scheduler", "stepper", "device_ms", phase)
    return None if ms is None else round(ms / 1000.0, 3)


def describe_delta(before: dict, after: dict, *path: str) -> float | int | None:
    """How much the describe value at `path` (e.g. "counters", "load_thread_ms") grew between two
    describes, to 0.1 (None: not reported)."""
    b, a = before, after
    for key in path:
        b, a = (b or {}).get(key), (a or {}).get(key)
    return round(a - b, 1) if a is not None and b is not None else None
