"""Engine benchmark: loraplex's slot-pool engine (as served) and plain PEFT over the bare base model.

    python bench/engine_bench.py --size 1b --json            # GPU (H100/H200), < 8 min
    python bench/engine_bench.py --size 8b --json            # GPU, < 8 min
    python bench/engine_bench.py --size smollm2-135m --threads 1 --clock cpu --json   # CPU, ~5 min
    python bench/engine_bench.py --size tiny --json          # smoke test, < 1 min on a CPU

One random-weight Llama-shaped model (parameters shared by every side), PEFT-saved random
adapter files (rank 16 on q,k,v,o,gate,up,down). Sides:

* ``base_generate``: the bare base model's own `generate` -- **the baseline of every ratio**.
* ``base_graphs`` (when ours decodes through the static loop, i.e. on a GPU): the bare base model
  through the engine's `StaticDecoder`, the same CUDA-graph loop as ours; the ``graphloop_*``
  ratios (ours over it) are a second column.
* ``ours``: `make_engine("multilora", model, EngineSettings(...))`, timed through `Engine.generate`
  (the handler's path, row lists in and token lists out; decode ``auto``: CUDA graphs on a GPU,
  transformers' `generate` on a CPU).
* ``peft``: `PeftModel.generate`; ``single`` after `set_adapter` outside the timed call (ours pays
  nothing there either), mixed scenarios with ``adapter_names=``.

Scenarios: ``single`` (one adapter on every row), ``mixed4`` (4 adapters round-robin), ``mixed_all``
(a distinct adapter per row).

Timing. Every timed call is one generate of N new tokens; hooks on the model's top module stamp
the start and end of each forward (GPU: CUDA events; CPU: the clock). prefill = from the call to
the end of its first forward; a decode step = from one forward's start to the next's (the last to
the call's end), and a call's decode figure is the median of its N-1 steps; where decode steps run
no forward (replayed CUDA graphs) it is the call's mean, (end - first forward's end) / (N - 1).
Each round times every side once, in an order rotated by one per round, so drift hits all alike.
A ratio is the median over rounds of that round's side / that round's baseline (``spread`` gives
min/median/max over the rounds); it is withheld (null, reason in ``too_noisy``) when fewer than
``--min-rounds`` rounds exist or (max - min) / median exceeds ``--max-spread``. ``peft_over_ours_*``
are from absolute times, per round. PEFT's mixed decode may use fewer new tokens
(``peft_new_tokens``) to stay in the time limit; its per-step figure does not depend on N beyond the
few extra cache positions.

Also: ``load_ms`` (file -> resident) and ``load_floor_ratio`` (over reading the file's bytes, plus a
pinned host->device copy on a GPU), ``switch_ms`` (`set_adapter`), ``delete_ms``,
``bytes_per_adapter`` (what a resident adapter reserves: a pool slot at r_max for us) and
``adapter_bytes`` (at its true rank), ``decode_floor_mixed_all`` = 1 + B x adapter bytes / base bytes,
``mem_drift_bytes`` after load/evict cycles (GPU: allocated bytes; CPU: live tensor bytes).
``--deadline-s`` (default per size) stops starting PEFT rounds, further rounds and drift cycles
early so the JSON is always printed in time; what ran is in the JSON.

``--json`` prints one JSON object as the last line. Figures: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import harness
from harness import TARGETS, Clock, ForwardTimer, Spread, log, med
from handler.engine import EngineSettings, GenerationRow, SamplingParams, make_engine
from handler.engine.static_decode import StaticDecoder

warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
warnings.filterwarnings("ignore", category=FutureWarning)

SCENARIOS = ("single", "mixed4", "mixed_all")

# Per-size defaults (every one can be overridden by its flag).
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": dict(batch=4, prompt_len=16, new_tokens=8, repeats=3, peft_repeats=3, load_repeats=3, cycles=20,
                 peft_cycles=5, peft_mixed_new_tokens=None, deadline_s=None, threads=1),
    "smollm2-135m": dict(batch=8, prompt_len=64, new_tokens=16, repeats=5, peft_repeats=5, load_repeats=10,
                         cycles=1000, peft_cycles=20, peft_mixed_new_tokens=None, deadline_s=None),
    "1b": dict(batch=32, prompt_len=256, new_tokens=32, repeats=5, peft_repeats=3, load_repeats=5, cycles=1000,
               peft_cycles=10, peft_mixed_new_tokens=8, deadline_s=420),
    "8b": dict(batch=32, prompt_len=256, new_tokens=32, repeats=5, peft_repeats=3, load_repeats=3, cycles=100,
               peft_cycles=5, peft_mixed_new_tokens=8, deadline_s=420),
}


def greedy_kwargs(ids: torch.Tensor, mask: torch.Tensor, new: int) -> dict[str, Any]:
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=1,
                pad_token_id=0, eos_token_id=None, use_cache=True)


class LoadFloor:
    """The physical floor of a load: read the file's bytes (page cache) into a preallocated
    host buffer and, on a GPU, copy them from pinned memory into a preallocated device buffer."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.f = path / "adapter_model.safetensors"
        n = self.f.stat().st_size
        cuda = device.type == "cuda"
        self.host = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
        self.view = memoryview(self.host.numpy())
        self.dev = torch.empty(n, dtype=torch.uint8, device=device) if cuda else None

    def __call__(self) -> None:
        with open(self.f, "rb", buffering=0) as fh:
            got = fh.readinto(self.view)
        assert got == len(self.view), (got, len(self.view))
        if self.dev is not None:
            self.dev.copy_(self.host, non_blocking=True)


class Ours:
    """The multilora engine exactly as the handler builds it (public names only)."""

    def __init__(self, base: torch.nn.Module, args: argparse.Namespace) -> None:
        self.model = harness.clone_sharing_params(base)
        self.settings = EngineSettings(num_slots=args.slots, max_rank=args.max_rank, target_modules=TARGETS,
                                       decode=args.decode)
        self.engine = make_engine("multilora", self.model, self.settings, eos_token_ids=[], pad_token_id=0)
        self.loaded: list[str] = []
        self.nbytes: dict[str, int] = {}

    def load(self, path: Path, name: str) -> None:
        self.nbytes[name] = self.engine.load_adapter(str(path), name).nbytes
        self.loaded.append(name)

    def delete(self, name: str) -> None:
        self.engine.delete_adapter(name)
        self.loaded.remove(name)

    def set(self, name: str) -> None:  # PEFT's name; rows name their adapter, so serving never calls it
        self.engine.set_adapter(name)

    @property
    def can_switch(self) -> bool:
        return hasattr(self.engine, "set_adapter")

    def prepare(self, ids: torch.Tensor, mask: torch.Tensor, names: list[str], new: int) -> Callable[[], Any]:
        params = SamplingParams(max_new_tokens=new)
        rows = [GenerationRow(input_ids=r, adapter=n, params=params) for r, n in zip(ids.tolist(), names)]
        return lambda: self.engine.generate(rows)

    def bytes_per_adapter(self, name: str) -> tuple[int, int]:
        st = self.engine.get_model_status()
        return st["pool_bytes"] // st["num_slots"], self.nbytes[name]


class Peft:
    """Plain PEFT over its own module tree (same parameter tensors)."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.model = harness.clone_sharing_params(base)
        self.m: Any = None
        self.loaded: list[str] = []

    def load(self, path: Path, name: str) -> None:
        if self.m is None:
            from peft import PeftModel

            self.m = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
        else:
            self.m.load_adapter(str(path), adapter_name=name)
        self.loaded.append(name)

    def delete(self, name: str) -> None:
        self.m.delete_adapter(name)
        self.loaded.remove(name)

    def set(self, name: str) -> None:
        self.m.set_adapter(name)

    def prepare(self, ids: torch.Tensor, mask: torch.Tensor, names: list[str], new: int) -> Callable[[], Any]:
        kw = greedy_kwargs(ids, mask, new)
        if len(set(names)) == 1:  # PEFT's own single-adapter path; the switch is not part of the call
            self.m.set_adapter(names[0])
        else:
            kw["adapter_names"] = names

        def call() -> Any:
            with torch.inference_mode():
                return self.m.generate(**kw)
        return call

    def bytes_per_adapter(self, name: str) -> tuple[int, int]:
        n = sum(p.numel() * p.element_size() for k, p in self.m.named_parameters()
                if f".{name}." in k and ("lora_A" in k or "lora_B" in k))
        return n, n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="smollm2-135m", choices=sorted(harness.SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--max-rank", type=int, default=64, help="pool r_max (EngineSettings.max_rank)")
    ap.add_argument("--slots", type=int, default=None, help="EngineSettings.num_slots (default: adapters + 1)")
    ap.add_argument("--decode", choices=("auto", "generate", "static", "graphs"), default="auto",
                    help="EngineSettings.decode for ours (auto: graphs on a GPU with Triton, else generate)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--peft-mixed-new-tokens", type=int,
                    help="new tokens of PEFT's mixed4/mixed_all calls (default: --new-tokens on a CPU, 8 on 1b/8b)")
    ap.add_argument("--repeats", type=int, help="timed rounds (every side once per round)")
    ap.add_argument("--peft-repeats", type=int, help="rounds that also time PEFT (the first k)")
    ap.add_argument("--min-rounds", type=int, default=3, help="a ratio from fewer rounds is withheld")
    ap.add_argument("--max-spread", type=float, default=0.2,
                    help="a ratio whose (max - min) / median over rounds exceeds this is withheld")
    ap.add_argument("--deadline-s", type=float,
                    help="wall-clock budget (default 420 on 1b/8b): past 85%% no PEFT round starts (past 60%% once "
                         "--min-rounds of them ran), past 80%% no round starts once --min-rounds ran, past 90%% the "
                         "drift cycles stop")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = process CPU time (shared CPU machine; use with --threads 1)")
    ap.add_argument("--load-repeats", type=int)
    ap.add_argument("--cycles", type=int, help="load/evict cycles for the drift check (ours)")
    ap.add_argument("--peft-cycles", type=int, help="the same for PEFT (each of its cycles costs far more)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for k, v in PROFILES[args.size].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.peft_repeats = min(args.peft_repeats, args.repeats)
    args.peft_mixed_new_tokens = min(args.peft_mixed_new_tokens or args.new_tokens, args.new_tokens)
    args.adapters = max(args.batch, 4)
    args.slots = args.slots or args.adapters + 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()

    def past(frac: float) -> bool:
        return args.deadline_s is not None and time.perf_counter() - t_start > frac * args.deadline_s

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(device, args.clock)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    B, N = args.batch, args.new_tokens
    names = [f"a{i}" for i in range(args.adapters)]
    res: dict[str, Any] = {
        "size": args.size, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": B,
        "prompt_len": args.prompt_len, "new_tokens": N, "rank": args.rank, "max_rank": args.max_rank,
        "slots": args.slots, "clock": args.clock, "deadline_s": args.deadline_s,
        "min_rounds": args.min_rounds, "max_spread": args.max_spread, "repeats": args.repeats,
        "peft_repeats": args.peft_repeats, "cycles": args.cycles, "peft_cycles": args.peft_cycles}
    res.update(harness.env_info(device))
    log(f"[0s] {res}")

    base = harness.build_base(args.size, dtype, device)
    tmp = tempfile.TemporaryDirectory(prefix="loraplex-bench-")
    paths = harness.make_adapters(base, Path(tmp.name), args.adapters, args.rank, args.alpha)
    sides: dict[str, Any] = {"ours": Ours(base, args)}
    if not args.skip_peft:
        sides["peft"] = Peft(base)
    res["decode"] = sides["ours"].engine.get_model_status().get("decode")
    res["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(sides["ours"].settings).items()}

    # ---- load / delete / switch / floor, interleaved ------------------------------
    for s in sides.values():  # warm-up (PEFT's first load wraps the model)
        s.load(paths[0], names[0])
    floor = LoadFloor(paths[1], device)
    clock.timed(floor)
    t_floor: list[float] = []
    t_load: dict[str, list[float]] = {k: [] for k in sides}
    t_del: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.load_repeats):
        t_floor.append(clock.timed(floor))
        for k, s in sides.items():
            t_load[k].append(clock.timed(lambda: s.load(paths[1], names[1])))
            t_del[k].append(clock.timed(lambda: s.delete(names[1])))
    for s in sides.values():
        for p, n in zip(paths[1:], names[1:]):
            s.load(p, n)
    t_switch: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(20):
        for k, s in sides.items():
            if getattr(s, "can_switch", True):
                for n in (names[1], names[0]):
                    t_switch[k].append(clock.timed(lambda: s.set(n)))
    res["load_floor_ms"] = med(t_floor)
    for k, s in sides.items():
        p = "" if k == "ours" else "peft_"
        res[p + "load_ms"] = med(t_load[k])
        res[p + "load_floor_ratio"] = med(t_load[k]) / med(t_floor)
        res[p + "switch_ms"] = med(t_switch[k]) if t_switch[k] else None  # None: the engine has no switch
        res[p + "delete_ms"] = med(t_del[k])
        res[p + "bytes_per_adapter"], res[p + "adapter_bytes"] = s.bytes_per_adapter(names[0])
    del floor
    log(f"[{time.perf_counter() - t_start:.0f}s] load/switch/delete: "
        + str({k: round(v, 4) for k, v in res.items() if k.endswith(("_ms", "_ratio")) and v is not None}))

    # ---- prefill / decode ------------------------------------------------------------
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, harness.SIZES[args.size]["vocab_size"], (B, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    rows_of = {"single": [names[0]] * B, "mixed4": [names[i % 4] for i in range(B)], "mixed_all": names[:B]}
    pure = harness.clone_sharing_params(base)
    base_dec = None
    if res["decode"] in ("graphs", "static"):
        base_dec = StaticDecoder(pure, use_graphs=res["decode"] == "graphs")

    def base_generate(_ids, _mask, _names, new):
        kw = greedy_kwargs(_ids, _mask, new)

        def call():
            with torch.inference_mode():
                return pure.generate(**kw)
        return call

    def base_graphs(_ids, _mask, _names, new):
        def call():
            with torch.inference_mode():
                return base_dec.generate(_ids, _mask, None, max_new_tokens=new, do_sample=False, eos_token_id=[],
                                         pad_token_id=0)
        return call

    # job -> (prepare(ids, mask, names, new) -> call, model whose forwards are timed, rows, new tokens)
    jobs: dict[str, tuple[Callable, torch.nn.Module, list[str] | None, int]] = {
        "base_generate": (base_generate, pure, None, N)}
    if base_dec is not None:
        jobs["base_graphs"] = (base_graphs, pure, None, N)
    for k, s in sides.items():
        for sc, rows in rows_of.items():
            new = args.peft_mixed_new_tokens if k == "peft" and sc != "single" else N
            jobs[f"{k}_{sc}"] = (s.prepare, s.model, rows, new)
    res["peft_new_tokens"] = {sc: jobs[f"peft_{sc}"][3] for sc in SCENARIOS} if "peft" in sides else None

    res["warmup_ms"] = {}  # each side's first call, generate(2): includes graph capture and kernel JIT
    for job, (prep, _, rows, _) in jobs.items():
        res["warmup_ms"][job] = clock.timed(prep(ids, mask, rows, 2))
        log(f"[{time.perf_counter() - t_start:.0f}s] warm-up {job}: generate(2) {res['warmup_ms'][job]:.0f} ms")

    rec: dict[str, list[tuple[int, harness.CallTiming]]] = {j: [] for j in jobs}
    order = list(jobs)
    rounds = peft_rounds = 0
    for r in range(args.repeats):
        if r >= args.min_rounds and past(0.8):
            break
        # PEFT's first --min-rounds rounds may start until 85% of the deadline, later ones until 60%
        with_peft = peft_rounds < args.peft_repeats and not past(0.85 if peft_rounds < args.min_rounds else 0.6)
        peft_rounds += with_peft and "peft" in sides
        rot = r % len(order)
        for job in order[rot:] + order[:rot]:
            if job.startswith("peft_") and not with_peft:
                continue
            prep, model, rows, new = jobs[job]
            fn = prep(ids, mask, rows, new)
            gc.collect()
            gc.disable()
            try:
                t = ForwardTimer(model, clock).call(fn, new)
            finally:
                gc.enable()
            rec[job].append((r, t))
        rounds += 1
        log(f"[{time.perf_counter() - t_start:.0f}s] round {r}: " + ", ".join(
            f"{j} {v[-1][1].prefill_ms:.1f}+{v[-1][1].decode_step_ms:.2f}/step" for j, v in rec.items()
            if v and v[-1][0] == r))
    res["rounds"] = rounds
    res["peft_rounds"] = peft_rounds
    res["decode_step_method"] = {j: ("per-step median" if v and v[0][1].steps_ms is not None
                                     else "call mean (decode steps ran no forward: replayed graphs)")
                                 for j, v in rec.items()}
    res["spread"], res["too_noisy"] = {}, {}

    def absolute(job: str) -> None:
        for what in ("prefill_ms", "decode_step_ms"):
            s = Spread([getattr(t, what) for _, t in rec[job]])
            res[f"{job}_{what}"] = med(s.values)
            res["spread"][f"{job}_{what}"] = s.summary()

    def ratio(key: str, num: str, den: str, what: str) -> None:
        d = dict(rec[den])
        s = Spread([getattr(t, what) / getattr(d[r], what) for r, t in rec[num] if r in d])
        res["spread"][key] = s.summary()
        reason = None
        if s.n < args.min_rounds:
            reason = f"{s.n} paired rounds (< --min-rounds {args.min_rounds})"
        elif s.rel_range() > args.max_spread:
            reason = f"(max - min) / median = {s.rel_range():.2f} > --max-spread {args.max_spread}"
        res[key] = None if reason else med(s.values)
        if reason:
            res["too_noisy"][key] = reason

    for job in jobs:
        absolute(job)
    for sc in SCENARIOS:
        for what, label in (("prefill_ms", "prefill"), ("decode_step_ms", "decode")):
            ratio(f"{label}_ratio_{sc}", f"ours_{sc}", "base_generate", what)
            if "peft" in sides:
                ratio(f"peft_{label}_ratio_{sc}", f"peft_{sc}", "base_generate", what)
                ratio(f"peft_over_ours_{label}_{sc}", f"peft_{sc}", f"ours_{sc}", what)
            if base_dec is not None:
                ratio(f"graphloop_{label}_ratio_{sc}", f"ours_{sc}", "base_graphs", what)
    if base_dec is not None:
        ratio("base_graphs_over_generate_prefill", "base_graphs", "base_generate", "prefill_ms")
        ratio("base_graphs_over_generate_decode", "base_graphs", "base_generate", "decode_step_ms")
        res["base_graph_captures"] = base_dec.captures
    dec = sides["ours"].engine.get_model_status().get("decoder")
    if dec:
        res["ours_graph_captures"] = dec["captures"]
        res["ours_graph_replays"] = sum(b["replays"] for b in dec["buckets"])
        res["ours_graph_fallbacks"] = dec["fallbacks"]
    res["base_model_bytes"] = harness.param_bytes(base)
    res["decode_floor_mixed_all"] = 1 + B * res["adapter_bytes"] / res["base_model_bytes"]
    del pure, base_dec, jobs
    log(f"[{time.perf_counter() - t_start:.0f}s] timing done")

    # ---- memory drift over load/evict cycles ------------------------------------------
    rng = torch.Generator().manual_seed(3)
    for k, s in sides.items():
        p = "" if k == "ours" else "peft_"
        cycles = args.peft_cycles if k == "peft" else args.cycles
        s.delete(names[-1])
        gc.collect()
        before = harness.live_tensor_bytes(device)
        t0 = time.perf_counter()
        done = 0
        for _ in range(cycles):  # evict a random resident adapter, load a random absent one
            if past(0.9):
                break
            done += 1
            s.delete(s.loaded[int(torch.randint(0, len(s.loaded), (1,), generator=rng))])
            absent = [n for n in names if n not in s.loaded]
            n = absent[int(torch.randint(0, len(absent), (1,), generator=rng))]
            s.load(paths[names.index(n)], n)
        start = names[:-1]
        for n in [n for n in start if n not in s.loaded]:  # back to the starting set of adapters
            s.delete(next(m for m in s.loaded if m not in start))
            s.load(paths[names.index(n)], n)
        res[p + "mem_drift_bytes"] = harness.live_tensor_bytes(device) - before
        res[p + "cycles_done"] = done
        res[p + "cycle_ms"] = (time.perf_counter() - t0) * 1000.0 / max(done, 1)
        log(f"[{time.perf_counter() - t_start:.0f}s] {k}: {done} cycles, drift {res[p + 'mem_drift_bytes']} bytes")

    res["wall_s"] = time.perf_counter() - t_start
    if device.type == "cpu":
        res["loadavg_end"] = list(os.getloadavg())
    tmp.cleanup()
    harness.emit(res, args.json)


if __name__ == "__main__":
    main()
