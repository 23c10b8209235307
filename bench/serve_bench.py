"""Serving benchmark: open-loop Poisson load on loraplex's request path, static vs continuous scheduling.

    # (a) a real TorchServe on the CPU, SmolLM2, both schedulers on the same workload (RESULTS.md "Serving")
    python bench/serve_bench.py --target torchserve --compare --rate 1.5 --json
    python bench/serve_bench.py --target torchserve --compare --sweep 0.5,1,2,4 --json
    # (b) LoraplexService in-process on a GPU, random-weight Llama shapes (the lead runs these via `device`)
    # (--sweep: the same requests at rising rates, up to the first where the run is saturated; the GPU
    # targets are read at saturation; the engine's static batch etc. are measured after the last rate)
    python bench/serve_bench.py --target inprocess --size 1b --sweep 8,16,32,64,128 --json
    python bench/serve_bench.py --target inprocess --size 8b --sweep 4,8,16,32,64 --json
    # smoke (tests/test_serve_bench_smoke.py): tiny random model, a few seconds of load
    python bench/serve_bench.py --target torchserve --model tiny --compare --requests 16 --rate 8 --json

Workload (loraplex_testing/serveload.py): Poisson arrivals at --rate req/s (the same requests at
every rate of a --sweep, only closer together); prompt length in words ~ lognormal(median
--prompt-median, sigma --prompt-sigma) clipped to [--prompt-min, --prompt-max], each word one token
of the model's tokenizer (deterministic text from a fixed word list; no dataset); output length
(max_tokens) ~ lognormal(--output-median, --output-sigma) clipped to [--output-min, --output-max];
tenants (--tenants, more than --resident slots) with Zipf(--zipf) popularity; temperature 0 (greedy).

Per scheduler: output_tok_s (output tokens of the 200 replies / (last reply's end - first request's
start)), TTFT / ITL / e2e p50 and p99 (nearest rank) from the client's own clock, errors_5xx,
wrong_outputs (after the timed run, a seeded sample of --check requests, or all when there are no
more, re-sent one at a time; a timed answer must equal its answer alone: `checked` says how many;
in-process in bf16/fp16 an answer that leaves the alone one at a near tie, its token within --tie-tol
nats of the alone run's best there, counts in `near_ties` instead: `serveload.wrong_outputs`),
evictions (the worker's eviction counters over the timed run), graph_captures_after_warmup (what the
worker reports; null where it reports none, e.g. a CPU), kernel_compiles_during_run (Triton kernel
variants the worker compiled during the timed run; 0 on a CPU). TorchServe: the official `openai` client,
streaming completions on /predictions/loraplex/1.0/v1; TTFT = first chunk with text, ITL = gaps
between text chunks. With `scheduler: static` the text is one chunk: TTFT ~ e2e and ITL is null.
`prefill_alone_ms`: the TTFT of a median-length prompt sent alone with max_tokens 1 (median of
--prefill-reps), the yardstick of the TTFT target.

In-process (b) adds: `engine_static_batch_tok_s` (the engine's own `generate` on a full batch of
--kv-rows mixed-tenant rows of median prompt and output length) and the continuous run's share of it,
`one_tenant_output_tok_s` (the same workload with every request on one tenant) and its ratio,
`device_busy` (the GPU's prefill and decode time over the run's span: near 1 means the run is at
the GPU's capacity whatever the drain rule says), `running_rows_p50` (sampled every 50 ms during
the run), `decode_step_rows` (the mean rows of the run's decode steps, from the stepper's
`row_steps`), `decode_step_ms` at that batch size and `itl_p99_over_decode_step`.

`--json` prints one JSON object last: the issue's keys (scheduler, rate, requests, output_tok_s,
ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms, e2e_p50_ms, e2e_p99_ms, errors_5xx, wrong_outputs,
evictions, graph_captures_after_warmup) plus the extras above; with --compare one such object per
scheduler under "static" and "continuous", plus continuous_over_static_tok_s,
continuous_over_static_e2e_p99 and ttft_p50_over_prefill; with --sweep a list "runs" of those.
Figures: bench/RESULTS.md, never here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import harness
from harness import log
from loraplex_testing import serveload
from loraplex_testing.serveload import LengthDist, ServeRequest, WorkloadSpec

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex")) / "smollm2-135m-instruct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("torchserve", "inprocess"), default="torchserve")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2", help="torchserve target's base model")
    ap.add_argument("--base-model", type=Path, default=SMOLLM2_DIR, help="SmolLM2 dir (converted if missing)")
    ap.add_argument("--size", choices=sorted(harness.SIZES), default="1b", help="inprocess target's Llama shape")
    ap.add_argument("--device", default=None, help="inprocess: cuda / cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="inprocess: float32 / bfloat16 (default bf16 on a GPU, fp32 on CPU)")
    ap.add_argument("--redis-bin", type=Path, default=None, help="redis-server binary (default: from PATH)")
    ap.add_argument("--scheduler", choices=("continuous", "static"), default="continuous")
    ap.add_argument("--compare", action="store_true", help="static and continuous on the same workload, same run")
    ap.add_argument("--rate", type=float, default=None, help="mean arrivals per second")
    ap.add_argument("--sweep", default=None, help="comma-separated rates, run in order; stops after the first "
                                                  "rate at which every scheduler run is saturated")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--tenants", type=int, default=None, help="torchserve: 12, inprocess: 64")
    ap.add_argument("--resident", type=int, default=None, help="resident adapter slots (torchserve: 4, inprocess: 32)")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=int, default=30, help="requests re-sent alone after the run (all if fewer)")
    ap.add_argument("--prompt-median", type=float)
    ap.add_argument("--prompt-sigma", type=float)
    ap.add_argument("--prompt-min", type=int)
    ap.add_argument("--prompt-max", type=int)
    ap.add_argument("--output-median", type=float)
    ap.add_argument("--output-sigma", type=float)
    ap.add_argument("--output-min", type=int)
    ap.add_argument("--output-max", type=int)
    ap.add_argument("--kv-rows", type=int, default=None, help="KV rows (config kv_rows; default 16, inprocess 32)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="config prefill_chunk: most prompt tokens prefilled per step (default: the config's)")
    ap.add_argument("--prefill-wait-steps", type=int, default=None,
                    help="config prefill_wait_steps (GPU graphs only; default: the config's)")
    ap.add_argument("--prefill-graphs", choices=("on", "off"), default=None,
                    help="config prefill_graphs (GPU graphs only; default: the config's, on)")
    ap.add_argument("--host-tier-mb", type=int, default=None,
                    help="config host_tier_mb (default: the config's, 2048; an 8B rank-16 adapter is ~84 MB, so "
                         "64 of them need ~5.4 GB for --warm all to leave every timed load to the host tier)")
    ap.add_argument("--drain-preempt-tokens", type=int, default=None,
                    help="config drain_preempt_tokens (default: the config's)")
    ap.add_argument("--step-overlap", choices=("auto", "on", "off"), default=None,
                    help="config step_overlap (default: the config's, auto = on with GPU graphs)")
    ap.add_argument("--step-mixed", choices=("auto", "on", "off"), default=None,
                    help="config step_mixed (default: the config's, auto = on with GPU graphs)")
    ap.add_argument("--mixed-prefill-tokens", type=int, default=None,
                    help="config mixed_prefill_tokens (default: the config's)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapter-files", type=int, default=8, help="inprocess: distinct random adapter files "
                                                                "(tenants share them round robin; each tenant is "
                                                                "still its own registry record and slot)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (worker: OMP_NUM_THREADS)")
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--request-timeout", type=float, default=900, help="client timeout per request, seconds")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run's files here (default: a temp dir)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="inprocess: cProfile the scheduler thread during each timed continuous run and print "
                         "its top N functions by own time and by cumulative time (stderr). On the GPU device's "
                         "Python 3.12 it recorded other threads' calls too (the fetch thread's reads): for where "
                         "the scheduler thread's time goes, read scheduler_thread_s_during_run")
    ap.add_argument("--tie-tol", type=float, default=None,
                    help="inprocess: a timed answer that leaves the alone answer at a token within this many "
                         "nats of the alone run's best there counts as a near tie, not wrong (default 0.1 in "
                         "bf16/fp16, exact in fp32; negative = exact)")
    ap.add_argument("--warm", choices=("all", "resident"), default="all",
                    help="inprocess: before the timed runs, load every tenant's adapter once (all: the timed "
                         "run's loads come from the host tier, a worker's steady state, where --host-tier-mb "
                         "holds them all) or only as many as "
                         "there are slots (resident: the others load from the store during the timed run)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    small = a.model == "tiny" if a.target == "torchserve" else a.size == "tiny"
    p0 = serveload.SMOKE_PROMPT_WORDS if small else serveload.PROMPT_WORDS
    o0 = serveload.SMOKE_OUTPUT_TOKENS if small else serveload.OUTPUT_TOKENS
    a.prompt = LengthDist(a.prompt_median or p0.median, p0.sigma if a.prompt_sigma is None else a.prompt_sigma,
                          a.prompt_min or p0.low, a.prompt_max or p0.high)
    a.output = LengthDist(a.output_median or o0.median, o0.sigma if a.output_sigma is None else a.output_sigma,
                          a.output_min or o0.low, a.output_max or o0.high)
    inproc = a.target == "inprocess"
    a.tenants = a.tenants or (64 if inproc else 12)
    a.resident = a.resident or (32 if inproc else 4)
    a.kv_rows = a.kv_rows or (32 if inproc else 16)
    a.requests = a.requests or (400 if inproc else 80)
    if a.sweep:
        a.rates = [float(x) for x in a.sweep.split(",") if x.strip()]
    else:
        a.rates = [a.rate if a.rate is not None else (1.0 if not small else 8.0)]
    if a.tenants <= a.resident:
        log(f"note: {a.tenants} tenants on {a.resident} resident slots: no evictions forced")
    return a


def handler_settings(a: argparse.Namespace, max_prompt_tokens: int) -> dict:
    """The worker config both schedulers share (the scheduler itself comes from the archive);
    `max_prompt_tokens`: the workload's longest prompt, tokenized (so no request is refused)."""
    from loraplex_testing.isolation import capacity_setting

    return {**capacity_setting(a.resident), "base_model_name": "", "idle_ttl_s": 3600, "registry_cache_s": 30,
            "max_prompt_tokens": max_prompt_tokens, "max_new_tokens_cap": a.output.high, "kv_rows": a.kv_rows,
            "max_rank": max(64, a.rank), "max_waiting": max(64, a.requests),
            **({"prefill_chunk": a.prefill_chunk} if a.prefill_chunk else {}),
            **({"prefill_wait_steps": a.prefill_wait_steps} if a.prefill_wait_steps is not None else {}),
            **({"prefill_graphs": a.prefill_graphs == "on"} if a.prefill_graphs else {}),
            **({"step_overlap": a.step_overlap} if a.step_overlap else {}),
            **({"step_mixed": a.step_mixed} if a.step_mixed else {}),
            **({"mixed_prefill_tokens": a.mixed_prefill_tokens} if a.mixed_prefill_tokens else {}),
            **({"host_tier_mb": a.host_tier_mb} if a.host_tier_mb is not None else {}),
            **({"drain_preempt_tokens": a.drain_preempt_tokens} if a.drain_preempt_tokens is not None else {})}


def saturated(res: dict, ref_e2e_ms: float | None = None) -> bool:
    """The server fell behind: after the last arrival it needed more than a quarter of the arrivals'
    span plus 3x the unloaded e2e p50 (`ref_e2e_ms`: the sweep's first rate; else 2 s) to drain."""
    slack = 3 * ref_e2e_ms / 1000 if ref_e2e_ms else 2.0
    return res["span_s"] - res["arrival_span_s"] > 0.25 * res["arrival_span_s"] + slack


def ratios(runs: dict[str, dict], prefill_ms: float | None) -> dict:
    s, c = runs.get("static"), runs.get("continuous")
    out: dict[str, Any] = {}
    if s and c:
        out["continuous_over_static_tok_s"] = (c["output_tok_s"] / s["output_tok_s"]
                                               if s["output_tok_s"] and c["output_tok_s"] else None)
        out["continuous_over_static_e2e_p99"] = (c["e2e_p99_ms"] / s["e2e_p99_ms"]
                                                 if s["e2e_p99_ms"] and c["e2e_p99_ms"] else None)
    if c and prefill_ms:
        out["ttft_p50_over_prefill"] = c["ttft_p50_ms"] / prefill_ms if c["ttft_p50_ms"] else None
    return out


def targets_cpu(r: dict) -> dict:
    return {"continuous_over_static_tok_s_ge_2": (r.get("continuous_over_static_tok_s") or 0) >= 2,
            "continuous_e2e_p99_le_third_of_static": (r.get("continuous_over_static_e2e_p99") or 9) <= 1 / 3,
            "ttft_p50_le_2x_prefill": (r.get("ttft_p50_over_prefill") or 9) <= 2}


def prompt_tokens(tokenizer: Any, work: Sequence[ServeRequest]) -> dict:
    n = [len(tokenizer(r.prompt)["input_ids"]) for r in work]
    return {"prompt_tokens_p50": serveload.percentile(n, 50), "prompt_tokens_p99": serveload.percentile(n, 99),
            "prompt_tokens_max": max(n)}


def median_prompt_request(work: Sequence[ServeRequest], length: int) -> ServeRequest:
    return min(work, key=lambda r: (abs(r.prompt_words - length), r.index))


# -- (a) TorchServe -----------------------------------------------------------------------------

def make_tenants(model_dir: Path, root: Path, n: int, rank: int, scale: float) -> dict[str, Path]:
    from loraplex_testing.models import make_random_lora

    return {f"sb{i}": make_random_lora(model_dir, root / f"sb{i}", r=rank, alpha=2 * rank, seed=1000 + i, scale=scale)
            for i in range(n)}


def run_torchserve(a: argparse.Namespace, work_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from loraplex_testing.models import make_tiny_llama

    import torch

    t_start = time.monotonic()
    env = environment(torch.device("cpu"))
    if a.model == "tiny":
        model_dir, scale = make_tiny_llama(work_dir / "model"), 0.1
    else:
        model_dir, scale = a.base_model, 0.02  # small A, B: answers move away from the base model's, stay text
        if not (model_dir / "config.json").exists():
            import subprocess

            subprocess.run([sys.executable, str(ROOT / "model_store" / "convert_smollm2.py"), "--out", str(model_dir)],
                           check=True, stdout=subprocess.DEVNULL)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    words = serveload.single_token_words(tokenizer)
    adapters = make_tenants(model_dir, work_dir / "adapters-src", a.tenants, a.rank, scale)
    schedulers = ["static", "continuous"] if a.compare else [a.scheduler]
    spec = WorkloadSpec(a.requests, a.rates[0], a.zipf, a.prompt, a.output, a.seed)
    base_work = serveload.make_workload(spec, list(adapters), words)
    lengths = prompt_tokens(tokenizer, base_work)
    settings = handler_settings(a, max(lengths["prompt_tokens_max"], 16))
    stack = serveload.TorchServeStack(work_dir / "stack", model_dir, adapters, schedulers, handler=settings,
                                      threads=a.threads or 1)
    stack.start()
    runs: list[dict] = []
    try:
        t_ready = time.monotonic()
        probe = median_prompt_request(base_work, int(a.prompt.median))
        for sch in schedulers:  # warm: the first forward (and the probe tenant's load) off the clock
            serveload.drive_openai(stack.base_url(sch), stack.token(sch), [probe], open_loop=False, max_tokens=2)
        ref: dict[str, float] = {}  # each scheduler's e2e p50 at the first rate
        for rate in a.rates:
            work = serveload.retimed(base_work, a.rates[0], rate)
            per: dict[str, dict] = {}
            for sch in schedulers:
                log(f"{sch}: {len(work)} requests at {rate} req/s")

                def send(w, open_loop, max_tokens, sch=sch):
                    return serveload.drive_openai(stack.base_url(sch), stack.token(sch), w, open_loop=open_loop,
                                                  max_tokens=max_tokens, timeout=a.request_timeout)

                res, _ = serveload.timed_phase(send, lambda sch=sch: stack.describe(sch), work, scheduler=sch,
                                               rate=rate, check=a.check, seed=a.seed)
                if sch == "static":
                    res["note"] = ("static: the whole text is one chunk (then the last chunk with usage), "
                                   "so TTFT ~ e2e and ITL is null")
                res["saturated"] = saturated(res, ref.get(sch))
                ref.setdefault(sch, res["e2e_p50_ms"])
                per[sch] = res
                log(json.dumps({k: res[k] for k in ("output_tok_s", "ttft_p50_ms", "e2e_p50_ms", "e2e_p99_ms",
                                                     "errors_5xx", "wrong_outputs", "saturated")}))
            prefill = prefill_alone(stack, schedulers, probe, a.prefill_reps)
            runs.append(merge(per, rate, prefill))
            if a.sweep and all(r["saturated"] for r in per.values()):
                break
    finally:
        stack.stop()
    meta = {"target": "torchserve", "model": a.model if a.model == "tiny" else str(a.base_model.name),
            "tenants": a.tenants, "resident_slots": a.resident, "num_slots": settings["num_slots"],
            "kv_rows": a.kv_rows, "prefill_chunk": a.prefill_chunk, "threads": a.threads or 1,
            "workload": spec.describe(), "words": len(words),
            **lengths,
            "notes": stack.notes, "startup_s": round(t_ready - t_start, 1),
            "wall_s": round(time.monotonic() - t_start, 1), **env, "loadavg_end": load_now()}
    return finish(runs, meta, cpu_targets=a.model != "tiny")


def prefill_alone(stack: Any, schedulers: Sequence[str], probe: ServeRequest, reps: int) -> dict:
    """TTFT of one median-length prompt alone, max_tokens 1, per instance (median of `reps`)."""
    out = {}
    for sch in schedulers:
        got = serveload.drive_openai(stack.base_url(sch), stack.token(sch), [probe] * reps, open_loop=False,
                                     max_tokens=1)
        ttft = [o.first - o.start for o in got if o.ok and o.first is not None]
        out[sch] = round(statistics.median(ttft) * 1000, 2) if ttft else None
    return {"prefill_alone_ms": out.get("continuous", out.get(schedulers[0])), "prefill_alone_ms_by_scheduler": out,
            "prefill_prompt_words": probe.prompt_words}


def merge(per: dict[str, dict], rate: float, prefill: dict) -> dict:
    if len(per) == 1:
        (res,) = per.values()
        return {**res, **prefill, **ratios(per, prefill["prefill_alone_ms"])}
    return {"rate": rate, **per, **ratios(per, prefill["prefill_alone_ms"]), **prefill}


def finish(runs: list[dict], meta: dict, *, cpu_targets: bool) -> dict:
    if cpu_targets:
        for r in runs:
            if "static" in r and "continuous" in r:
                r["targets"] = targets_cpu(r)
    if len(runs) == 1:
        return {**runs[0], **meta}
    return {"runs": runs, **meta}


def environment(device: Any) -> dict:
    """harness.env_info (versions, device, load average now) plus the openai client's and TorchServe's versions."""
    from importlib.metadata import PackageNotFoundError, version

    info = harness.env_info(device)
    for pkg in ("openai", "torchserve"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def load_now() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- (b) in-process -----------------------------------------------------------------------------

def word_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer whose every id 3.. is the word ``w<id>`` (0 pad, 1 bos, 2 eos), so
    a random model's tokens all decode to distinct text and a prompt of n words is n tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<pad>")


def model_spec(model: Any, name: str) -> Any:
    """The BaseModelSpec of an in-memory model (what `from_model_dir` reads from headers)."""
    import torch

    from tenant_registry.validate import BaseModelSpec

    linear = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    return BaseModelSpec(name=name, model_dir="", model_type="llama", linear=linear)


class InProcess:
    """LoraplexService over a random-weight Llama (shared parameters between services), its
    tenants onboarded in a private redis-server."""

    def __init__(self, a: argparse.Namespace, work_dir: Path) -> None:
        import torch

        self.a = a
        self.work_dir = work_dir
        self.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if self.device.type == "cuda"
                                                              else torch.float32)
        if a.redis_bin is not None:
            os.environ["PATH"] = f"{a.redis_bin.resolve().parent}:{os.environ.get('PATH', '')}"
        from loraplex_testing.services import RedisServer, free_port

        self.redis = RedisServer(free_port(), work_dir / "redis")
        self.base = harness.build_base(a.size, self.dtype, self.device)
        self.tokenizer = word_tokenizer(harness.SIZES[a.size]["vocab_size"])
        files = harness.make_adapters(self.base, work_dir / "adapter-files", min(a.adapter_files, a.tenants),
                                      a.rank, 2 * a.rank)
        self.adapters = {f"t{i}": files[i % len(files)] for i in range(a.tenants)}
        self.store = work_dir / "adapters"
        self.services: list[Any] = []
        self.max_prompt_tokens = a.prompt.high  # set from the workload by run_inprocess

    def start(self) -> None:
        self.redis.start()
        serveload.onboard_adapters(self.adapters, Path(""), redis_url=self.redis.url, store=self.store,
                                   spec=model_spec(self.base, f"random-{self.a.size}"))

    def service(self, scheduler: str) -> Any:
        from handler.service import LoraplexService
        from loraplex_common.config import LoraplexConfig

        a = self.a
        known = serveload.known_handler_keys()
        settings = {**handler_settings(a, self.max_prompt_tokens), "redis_url": self.redis.url, "redis_prefix": serveload.PREFIX,
                    "adapter_store": str(self.store), "scheduler": scheduler}
        cfg = LoraplexConfig.from_mapping({k: v for k, v in settings.items() if k in known})
        model = harness.clone_sharing_params(self.base)
        svc = LoraplexService.from_model(cfg, model, self.tokenizer, eos_token_ids=[], pad_token_id=0)
        self.services.append(svc)
        return svc

    def stop(self) -> None:
        for svc in self.services:
            svc.stop()
        self.redis.stop()


@contextlib.contextmanager
def scheduler_profile(svc: Any, top: int, title: str) -> Iterator[None]:
    """cProfile on the scheduler thread (enabled and disabled there, between two steps, through
    `Scheduler.call`) around the block; prints the top `top` rows by tottime and cumtime.
    Wall-clock profile: a function that waits for the GPU (a `.tolist()`) is charged the wait. On
    the GPU device's Python 3.12 it also recorded other threads' calls (the adapter fetch thread's)."""
    if not top or getattr(svc, "scheduler", None) is None:
        yield
        return
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    svc.scheduler.call(prof.enable)
    try:
        yield
    finally:
        svc.scheduler.call(prof.disable)
        for order in ("tottime", "cumtime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(top)
            log(f"--- scheduler thread profile, {title}, by {order} ---\n{buf.getvalue()}")


CHECK_TOP_LOGPROBS = 5  # the checked requests re-sent alone ask for this many top log-probs per token


def tie_tol(a: argparse.Namespace, dtype: Any) -> float | None:
    """`serveload.wrong_outputs`' near-tie tolerance: --tie-tol, else HALF_TIE_TOL in bf16/fp16
    (a row's rounding depends on its batch's shape there), else None (fp32: answers must be equal)."""
    import torch

    if a.tie_tol is not None:
        return a.tie_tol if a.tie_tol >= 0 else None
    return HALF_TIE_TOL if dtype in (torch.bfloat16, torch.float16) else None


HALF_TIE_TOL = 0.1  # nats


def _sample_running(svc: Any, stop: threading.Event, into: list[int]) -> None:
    """Running rows every 50 ms (the scheduler's own lock-protected snapshot, not a describe)."""
    if getattr(svc, "scheduler", None) is None:
        return
    while not stop.wait(0.05):
        into.append(int(svc.scheduler.snapshot()["running"]))


def engine_tok_s(engine: Any, rows_adapters: Sequence[str | None], prompt_len: int, new: int, reps: int = 3) -> float:
    """Output tokens/s of the engine's own `generate` on one static batch (median of `reps`, after a warm call)."""
    from handler.engine import GenerationRow, SamplingParams

    clock = harness.Clock(_engine_device(engine))
    params = SamplingParams(max_new_tokens=new)
    rows = [GenerationRow(input_ids=[3 + (7 * i + j) % 1000 for j in range(prompt_len)], adapter=ad, params=params)
            for i, ad in enumerate(rows_adapters)]
    engine.generate(rows)
    ms = [clock.timed(lambda: engine.generate(rows)) for _ in range(reps)]
    return len(rows) * new / (statistics.median(ms) / 1000)


def _engine_device(engine: Any) -> Any:
    import torch

    return torch.device(str(engine.get_model_status().get("device", "cpu")))


def decode_step_ms(engine: Any, adapters: Sequence[str | None], prompt_len: int, n: int = 17) -> float:
    """One decode step of a batch of len(adapters) rows: (t(n new) - t(1 new)) / (n - 1), medians of 3."""
    from handler.engine import GenerationRow, SamplingParams

    clock = harness.Clock(_engine_device(engine))

    def call(new: int) -> float:
        rows = [GenerationRow(input_ids=[3 + (5 * i + j) % 1000 for j in range(prompt_len)], adapter=ad,
                              params=SamplingParams(max_new_tokens=new)) for i, ad in enumerate(adapters)]
        engine.generate(rows)
        return statistics.median([clock.timed(lambda: engine.generate(rows)) for _ in range(3)])

    return max(0.0, (call(n) - call(1)) / (n - 1))


def run_inprocess(a: argparse.Namespace, work_dir: Path) -> dict:
    import torch

    t_start = time.monotonic()
    if a.threads:
        torch.set_num_threads(a.threads)
    ip = InProcess(a, work_dir)
    env = environment(ip.device)
    words = [f"w{i}" for i in range(3, min(2003, harness.SIZES[a.size]["vocab_size"]))]
    spec = WorkloadSpec(a.requests, a.rates[0], a.zipf, a.prompt, a.output, a.seed)
    base_work = serveload.make_workload(spec, list(ip.adapters), words)
    lengths = prompt_tokens(ip.tokenizer, base_work)
    ip.max_prompt_tokens = max(lengths["prompt_tokens_max"], 16)
    schedulers = ["static", "continuous"] if a.compare else [a.scheduler]
    runs: list[dict] = []
    extras: dict[str, Any] = {}
    ip.start()
    try:
        svcs = {s: ip.service(s) for s in schedulers}
        for sch, svc in svcs.items():
            extras.setdefault("scheduler_kind", {})[sch] = getattr(svc, "scheduler_kind", "static")
        probe = median_prompt_request(base_work, int(a.prompt.median))
        warm = [probe] + [next(r for r in base_work if r.tenant == t) for t in dict.fromkeys(
            r.tenant for r in base_work)][: None if a.warm == "all" else a.resident]
        extras["warm"] = a.warm
        for sch, svc in svcs.items():  # first loads and first forwards off the clock
            serveload.drive_inprocess(svc, warm, scheduler=_kind(svc, sch), open_loop=False, max_tokens=2)
        ref: dict[str, float] = {}  # each scheduler's e2e p50 at the first rate
        for rate in a.rates:
            work = serveload.retimed(base_work, a.rates[0], rate)
            per: dict[str, dict] = {}
            for sch, svc in svcs.items():
                kind = _kind(svc, sch)
                log(f"{sch} ({kind}): {len(work)} requests at {rate} req/s")
                running: list[int] = []
                stop = threading.Event()
                sampler = threading.Thread(target=_sample_running, args=(svc, stop, running), daemon=True)
                sampler.start()

                def send(w, open_loop, max_tokens, svc=svc, kind=kind):
                    return serveload.drive_inprocess(svc, w, scheduler=kind, open_loop=open_loop,
                                                     max_tokens=max_tokens, event_timeout=a.request_timeout,
                                                     logprobs=0 if open_loop else CHECK_TOP_LOGPROBS)

                with scheduler_profile(svc, a.profile if kind == "continuous" else 0, f"{sch} at {rate} req/s"):
                    res, _ = serveload.timed_phase(send, svc.describe, work, scheduler=kind, rate=rate,
                                                   check=a.check, seed=a.seed, tie_tol=tie_tol(a, ip.dtype))
                stop.set()
                sampler.join()
                res["running_rows_p50"] = serveload.percentile([n for n in running if n], 50)  # while busy
                res["saturated"] = saturated(res, ref.get(sch))
                ref.setdefault(sch, res["e2e_p50_ms"])
                if kind == "static":
                    res["note"] = "static: replies come whole, so TTFT = e2e and ITL is null"
                per[sch] = res
                log(json.dumps({k: res[k] for k in ("output_tok_s", "ttft_p50_ms", "itl_p99_ms", "e2e_p99_ms",
                                                     "errors_5xx", "wrong_outputs", "saturated")}))
            runs.append(merge(per, rate, {"prefill_alone_ms": None}))
            if a.sweep and all(r["saturated"] for r in per.values()):
                break
        if "continuous" in svcs and _kind(svcs["continuous"], "continuous") == "continuous":
            extras.update(gpu_extras(a, svcs["continuous"], base_work, runs[-1], ip))
    finally:
        ip.stop()
    meta = {"target": "inprocess", "size": a.size, "device": str(ip.device), "dtype": str(ip.dtype).replace("torch.", ""),
            "tenants": a.tenants, "resident_slots": a.resident, "kv_rows": a.kv_rows,
            "adapter_files": min(a.adapter_files, a.tenants), "rank": a.rank, "workload": spec.describe(),
            **lengths, **extras, "wall_s": round(time.monotonic() - t_start, 1), **env, "loadavg_end": load_now()}
    return finish(runs, meta, cpu_targets=False)


def decode_rows(res: dict) -> int | None:
    """The mean rows of the timed run's decode steps, from the stepper's own counts (`row_steps`):
    the batch size its ITL is compared at. (The 50 ms `running_rows_p50` sampler is a Python
    thread: with the scheduler thread busy it wakes late and samples the drained tail mostly.)"""
    rows = (res.get("row_steps_during_run") or {}).get("decoding")
    steps = res.get("decode_steps_during_run")
    return round(rows / steps) if rows and steps else None


def _kind(svc: Any, asked: str) -> str:
    """The scheduler the service really runs (a peft engine runs static whatever was asked)."""
    return getattr(svc, "scheduler_kind", "static") if asked == "continuous" else "static"


def gpu_extras(a: argparse.Namespace, svc: Any, base_work: Sequence[ServeRequest], last: dict, ip: InProcess) -> dict:
    """The one-tenant variant, then (service stopped) the engine's static batch and one decode step."""
    from dataclasses import replace

    cont = last.get("continuous", last)
    rate = cont["rate"]
    one = [replace(r, tenant=base_work[0].tenant) for r in serveload.retimed(base_work, a.rates[0], rate)]
    log(f"one tenant: {len(one)} requests at {rate} req/s")
    solo = serveload.summarize(serveload.drive_inprocess(svc, one, scheduler="continuous"), scheduler="continuous",
                               rate=rate)
    svc.stop()
    engine = svc.engine
    loaded = [n for n in engine.peft_config][: a.kv_rows] or [None]
    rows = [loaded[i % len(loaded)] for i in range(a.kv_rows)]
    prompt_len, new = int(a.prompt.median), int(a.output.median)
    static_tok_s = engine_tok_s(engine, rows, prompt_len, new)
    b_run = decode_rows(cont) or int(cont.get("running_rows_p50") or 1)
    step = decode_step_ms(engine, rows[: max(1, b_run)], prompt_len)
    out = {"one_tenant_output_tok_s": solo["output_tok_s"],
           "one_tenant_over_mixed_tok_s": (solo["output_tok_s"] / cont["output_tok_s"]
                                           if cont["output_tok_s"] and solo["output_tok_s"] else None),
           "one_tenant_errors_5xx": solo["errors_5xx"],
           "engine_static_batch_tok_s": round(static_tok_s, 2),
           "continuous_over_engine_static_batch": (cont["output_tok_s"] / static_tok_s if cont["output_tok_s"] else None),
           "engine_static_batch": {"rows": len(rows), "prompt_tokens": prompt_len, "new_tokens": new},
           "decode_step_ms": round(step, 3), "decode_step_rows": b_run,
           "itl_p99_over_decode_step": (cont["itl_p99_ms"] / step if cont.get("itl_p99_ms") and step else None)}
    out["targets"] = {"tok_s_ge_85pct_of_engine_static_batch": (out["continuous_over_engine_static_batch"] or 0) >= 0.85,
                      "one_tenant_at_most_10pct_faster": (out["one_tenant_over_mixed_tok_s"] or 9) <= 1.10,
                      "graph_captures_after_warmup_0": cont.get("graph_captures_after_warmup") in (0, None),
                      "itl_p99_le_1_5x_decode_step": (out["itl_p99_over_decode_step"] or 9) <= 1.5}
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    if a.target == "torchserve":
        torch.set_num_threads(1)  # the client side; the workers get OMP_NUM_THREADS
    with tempfile.TemporaryDirectory(prefix="lpx-serve-") as tmp:
        work_dir = a.workdir.resolve() if a.workdir else Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        res = run_torchserve(a, work_dir) if a.target == "torchserve" else run_inprocess(a, work_dir)
    harness.emit(res, a.json)
    runs = res.get("runs", [res])
    per = [r[s] for r in runs for s in ("static", "continuous") if s in r] or runs
    bad = sum((r.get("wrong_outputs") or 0) + (r.get("errors_5xx") or 0) for r in per)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
