"""Side-by-side benchmark: loraplex's slot-pool engine vs plain PEFT, one run.

Same random-weight Llama-shaped model (parameters shared between the three
model objects), same PEFT-saved adapter files. What is measured and how:

* ``load_ms``: median wall time of `load_adapter` (file -> resident, ready to
  serve), each followed by a delete. ``load_floor_ratio`` = load_ms / floor,
  floor = median time to read the file's bytes (+ a pinned host->device copy
  of them on GPU), measured in the same run.
* ``switch_ms``: median `set_adapter` with every bench adapter resident.
* ``delete_ms``: median `delete_adapter`.
* prefill / decode ratios over the *pure base model* (no LoRA layers at all):
  prefill = median time of ``generate(max_new_tokens=1)`` (one forward over the
  prompt); decode = median ``generate(N)`` - median prefill, i.e. the N-1
  decode steps. Scenarios: ``single`` (one adapter for every row; PEFT via
  `set_adapter`), ``mixed4`` (4 distinct adapters round-robin) and ``mixed_all``
  (a distinct adapter on every row), PEFT via ``adapter_names=``. All scenarios
  are interleaved round by round (``--repeats``) so drift of a noisy machine
  hits all of them alike. ``--decode`` (auto: ``graphs`` on CUDA, ``generate``
  on the CPU) picks how ours *and the pure base model* decode: ``graphs`` runs
  both through the engine's `StaticDecoder` (each decode step a replayed CUDA
  graph, what the handler serves with); PEFT has only ``generate`` and its
  ratios are over the base model's ``generate`` (``base_generate_*_ms``).
  ``paired_*_ratio_*``: the same ratios as medians of per-round ratios (each
  round's ours over that round's base), which a slow drift of the machine
  cannot skew; printed beside the median-over-median keys the targets use.
* ``decode_floor_mixed_all`` = F = 1 + B x adapter bytes / base-model bytes.
* ``bytes_per_adapter``: what one resident adapter reserves (a pool slot at
  r_max for us; its parameters for PEFT); ``adapter_bytes``: bytes at its true rank.
* ``mem_drift_bytes``: memory after ``--cycles`` load/delete cycles minus
  before (GPU: `torch.cuda.memory_allocated`; CPU: bytes of all live tensors
  found by the garbage collector). PEFT runs ``--peft-cycles`` (default
  min(cycles, 100)) because each of its cycles costs ~100x ours.

``--json`` prints one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import warnings

warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handler.engine.multilora import MultiLoraModel  # noqa: E402
from handler.engine.static_decode import StaticDecoder  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
PREFIX = {"ours": "", "ours_nogroups": "nogroups_", "ours_unfused": "unfused_", "ours_ungated": "ungated_",
          "peft": "peft_"}  # JSON key prefix per engine
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (excludes time descheduled on a shared machine)


def timed(fn, device) -> float:
    sync(device)
    t0 = CLOCK()
    fn()
    sync(device)
    return (CLOCK() - t0) * 1000.0


def build_base(size: str, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def clone_sharing_params(model):
    """A new module tree over the same parameter tensors (no extra weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def make_adapters(base, root: Path, n: int, rank: int, alpha: int) -> list[Path]:
    """n PEFT-saved adapters (fp32 files, as PEFT saves them), random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    work = clone_sharing_params(base)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    pm = get_peft_model(work, cfg, adapter_name="a0")
    paths = []
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        name = f"a{i}"
        if i:
            pm.add_adapter(name, cfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if f".{name}." in pname and ("lora_A" in pname or "lora_B" in pname):
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        out = root / name
        pm.save_pretrained(str(out), selected_adapters=[name], safe_serialization=True)
        sub = out / name  # PEFT nests non-default adapter names
        paths.append(sub if (sub / "adapter_config.json").exists() else out)
    pm.unload()
    del pm, work
    gc.collect()
    return paths


def param_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def live_tensor_bytes(device) -> int:
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:
            continue
    return total


class LoadFloor:
    """The physical floor of a load: read the file's bytes (page cache) into a
    preallocated host buffer and, on a GPU, copy them host-to-device from pinned
    memory into a preallocated device buffer (non-blocking copy, then a sync in
    `timed`). Buffers are allocated once, outside the timing, so the floor
    contains no pinning or allocation cost (the engine reuses its pinned
    staging buffer the same way)."""

    def __init__(self, path: Path, device):
        self.f = path / "adapter_model.safetensors"
        self.device = device
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

    def ms(self) -> float:
        return timed(self, self.device)


def env_info(device) -> dict:
    import peft
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "device_name": "cpu"}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        from handler.engine import kernels

        backend = os.environ.get("LORAPLEX_LORA_BACKEND", "auto")
        info["lora_backend"] = ({"torch": "torch", "triton": "triton"}.get(backend, "auto (torch eager, triton in graphs)")
                                if kernels.available() else "torch")
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception:
            info["triton"] = None
    return info


def med(xs):
    return statistics.median(xs) if xs else float("nan")


class Side:
    """One engine's load/switch/delete/generate under the bench's common protocol."""

    def __init__(self, kind, base, args, device):
        self.kind = kind
        self.device = device
        self.args = args
        model = clone_sharing_params(base)
        self.decoder = None
        if kind.startswith("ours"):
            self.m = MultiLoraModel(model, max_adapters=args.max_adapters, max_rank=args.max_rank, target_modules=TARGETS,
                                    group_decode=kind != "ours_nogroups" and not args.no_lora_groups,
                                    group_prefill=kind != "ours_nogroups" and not args.no_lora_groups,
                                    decode_fused=kind != "ours_unfused", gated_mlp=kind != "ours_ungated")
            if args.decode != "generate":  # the engine's serving decode loop (what `decode: graphs` runs)
                self.decoder = StaticDecoder(model, use_graphs=args.decode == "graphs", lora=self.m)
        else:
            self.m = None
            self.base = model
        self.loaded: list[str] = []

    def load(self, path, name):
        if self.kind.startswith("ours"):
            self.m.load_adapter(path, name)
        elif self.m is None:
            from peft import PeftModel

            self.m = PeftModel.from_pretrained(self.base, str(path), adapter_name=name).eval()
        else:
            self.m.load_adapter(str(path), adapter_name=name)
        self.loaded.append(name)

    def delete(self, name):
        self.m.delete_adapter(name)
        self.loaded.remove(name)

    def set(self, name):
        self.m.set_adapter(name)

    def generate(self, ids, mask, names, new):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  num_beams=1, pad_token_id=0, eos_token_id=None, use_cache=True)
        with torch.inference_mode():
            if self.decoder is not None:
                return self.decoder.generate(ids, mask, names, max_new_tokens=new, do_sample=False, eos_token_id=[],
                                             pad_token_id=0)
            if self.kind.startswith("ours"):
                return self.m.generate(adapter_names=names, **kw)
            if len(set(names)) == 1:  # PEFT's own single-adapter path
                self.m.set_adapter(names[0])
                return self.m.generate(**kw)
            return self.m.generate(adapter_names=names, **kw)

    def bytes_per_adapter(self, name):
        if self.kind.startswith("ours"):
            return self.m.pool_bytes() // self.m.num_slots, self.m.adapter_nbytes(name)
        n = sum(p.numel() * p.element_size() for k, p in self.m.named_parameters()
                if f".{name}." in k and ("lora_A" in k or "lora_B" in k))
        return n, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="smollm2-135m", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--max-rank", type=int, default=64, help="pool r_max (engine default 64)")
    ap.add_argument("--max-adapters", type=int, default=None, help="pool slots (default max(batch, 4))")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peft-repeats", type=int, default=None,
                    help="timed rounds for PEFT's generate jobs (default --repeats): the first k rounds time "
                         "PEFT too, later rounds only base and ours (PEFT's mixed decode is slow on a GPU)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="wall-clock budget for the whole run: past 80%% of it no further PEFT rounds start "
                         "(at least one is always done) and the drift cycles stop early (the JSON records "
                         "how many ran), so a run under a hard time limit still prints its JSON")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = process CPU time (for a shared, oversubscribed CPU machine; use with --threads 1)")
    ap.add_argument("--load-repeats", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--peft-cycles", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--decode", choices=("auto", "generate", "graphs", "static"), default="auto",
                    help="how ours and the pure base model decode (auto: graphs on CUDA, generate on the CPU): "
                         "graphs/static = the engine's StaticDecoder (static KV cache; each decode step a replayed "
                         "CUDA graph, or eager); PEFT always uses generate and is compared with the base model's "
                         "generate")
    ap.add_argument("--no-lora-groups", action="store_true",
                    help="ours without the group launches (q/k/v and gate/up deltas from one kernel pair each, in "
                         "graph-captured decode steps and CUDA prefill): per-linear kernels in decode, the torch "
                         "gather + bmm path in prefill")
    ap.add_argument("--compare-groups", action="store_true",
                    help="also time ours without the group launches (as --no-lora-groups), in the same rounds "
                         "(keys nogroups_*)")
    ap.add_argument("--compare-unfused", action="store_true",
                    help="also time ours with decode groups as a shrink + expand launch pair ahead of cuBLAS GEMMs "
                         "instead of the GEMMs with the expand fused in, in the same rounds (keys unfused_*)")
    ap.add_argument("--compare-gated", action="store_true",
                    help="also time ours without the MLP's gate/up LoRA fused into its activation in prefill "
                         "(gate/up deltas through the group kernels and the base GEMMs), in the same rounds "
                         "(keys ungated_*)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.decode == "auto":
        args.decode = "generate" if cpu else "graphs"
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    args.batch = args.batch or (8 if cpu else 32)
    args.prompt_len = args.prompt_len or (64 if cpu else 256)
    args.new_tokens = args.new_tokens or (16 if cpu else 32)
    args.max_adapters = args.max_adapters or max(args.batch, 4)
    args.peft_cycles = args.peft_cycles if args.peft_cycles is not None else min(args.cycles, 100)
    args.peft_repeats = min(args.peft_repeats or args.repeats, args.repeats)
    t_start = time.perf_counter()

    def late() -> bool:
        return args.deadline_s is not None and time.perf_counter() - t_start > 0.8 * args.deadline_s
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    B, n_ad = args.batch, max(args.batch, 4)
    log(f"size={args.size} device={device} dtype={dtype} B={B} L={args.prompt_len} N={args.new_tokens} "
        f"rank={args.rank} r_max={args.max_rank} slots={args.max_adapters + 1} threads={torch.get_num_threads()}")

    base = build_base(args.size, dtype, device)
    tmp = tempfile.TemporaryDirectory(prefix="loraplex-bench-")
    paths = make_adapters(base, Path(tmp.name), n_ad, args.rank, args.alpha)
    names = [f"a{i}" for i in range(n_ad)]
    sides = {"ours": Side("ours", base, args, device)}
    if args.compare_groups:  # same engine without the decode group launches, timed in the same rounds
        sides["ours_nogroups"] = Side("ours_nogroups", base, args, device)
    if args.compare_unfused:  # same engine, decode expand as its own launch, timed in the same rounds
        sides["ours_unfused"] = Side("ours_unfused", base, args, device)
    if args.compare_gated:  # same engine, gate/up deltas added by their GEMMs, timed in the same rounds
        sides["ours_ungated"] = Side("ours_ungated", base, args, device)
    if not args.skip_peft:
        sides["peft"] = Side("peft", base, args, device)
    res: dict = {"size": args.size, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": B,
                 "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rank": args.rank,
                 "max_rank": args.max_rank, "slots": args.max_adapters + 1, "threads": torch.get_num_threads(),
                 "cycles": args.cycles, "peft_cycles": args.peft_cycles, "clock": args.clock,
                 "repeats": args.repeats, "peft_repeats": args.peft_repeats, "decode": args.decode}
    res.update(env_info(device))
    log("env:", json.dumps({k: res[k] for k in env_info(device)}))

    # ---- load / delete / floor (interleaved) ------------------------------
    floor, t_load, t_del = [], {k: [] for k in sides}, {k: [] for k in sides}
    for k, s in sides.items():  # warm-up (first PEFT load wraps the model)
        s.load(paths[0], names[0])
    lf = LoadFloor(paths[1], device)
    lf.ms()  # warm-up
    for _ in range(args.load_repeats):
        floor.append(lf.ms())
        for k, s in sides.items():
            t_load[k].append(timed(lambda: s.load(paths[1], names[1]), device))
            t_del[k].append(timed(lambda: s.delete(names[1]), device))
    for k, s in sides.items():
        for p, n in zip(paths[1:], names[1:]):
            s.load(p, n)
    t_switch = {k: [] for k in sides}
    for _ in range(20):
        for k, s in sides.items():
            for n in (names[1], names[0]):
                t_switch[k].append(timed(lambda: s.set(n), device))
    res["load_floor_ms"] = med(floor)
    for k in sides:
        p = PREFIX[k]
        res[p + "load_ms"] = med(t_load[k])
        res[p + "load_floor_ratio"] = med(t_load[k]) / med(floor)
        res[p + "switch_ms"] = med(t_switch[k])
        res[p + "delete_ms"] = med(t_del[k])
        res[p + "bytes_per_adapter"], res[p + "adapter_bytes"] = sides[k].bytes_per_adapter(names[0])
    del lf
    log("load/switch/delete:", {k: v for k, v in res.items() if "ms" in k or "ratio" in k})
    log(f"[{time.perf_counter() - t_start:.0f}s] partial {json.dumps(res)}")

    # ---- prefill / decode -------------------------------------------------
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, SIZES[args.size]["vocab_size"], (B, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    scen = {"single": [names[0]] * B, "mixed4": [names[i % 4] for i in range(B)], "mixed_all": names[:B]}
    pure = clone_sharing_params(base)
    pure_dec = None if args.decode == "generate" else StaticDecoder(pure, use_graphs=args.decode == "graphs")
    jobs = [("base", None, None)] + [(k, sc, rows) for k in sides for sc, rows in scen.items()]
    if pure_dec is not None and "peft" in sides:  # PEFT's ratios are over the base model's generate
        jobs.insert(1, ("base_generate", None, None))

    def gen(job, new):
        k, _, rows = job
        if k == "base" and pure_dec is not None:
            with torch.inference_mode():
                return pure_dec.generate(ids, mask, None, max_new_tokens=new, do_sample=False, eos_token_id=[],
                                         pad_token_id=0)
        if k in ("base", "base_generate"):
            with torch.inference_mode():
                return pure.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
        return sides[k].generate(ids, mask, rows, new)

    for job in jobs:  # warm-up, and the lengths are right
        t = timed(lambda: gen(job, 2), device)
        log(f"[{time.perf_counter() - t_start:.0f}s] warm-up {job[0]}/{job[1]}: generate(2) {t:.0f} ms")
    out = gen(jobs[-1], 2)
    assert out.shape == (B, args.prompt_len + 2), out.shape
    t_pre = {j[:2]: [] for j in jobs}
    t_full = {j[:2]: [] for j in jobs}
    peft_rounds = 0
    for rep in range(args.repeats):
        with_peft = rep < args.peft_repeats and not (rep > 0 and late())
        peft_rounds += with_peft and "peft" in sides
        for job in jobs:
            if job[0] == "peft" and not with_peft:
                continue
            t_pre[job[:2]].append(timed(lambda: gen(job, 1), device))
            t_full[job[:2]].append(timed(lambda: gen(job, args.new_tokens), device))
        log(f"[{time.perf_counter() - t_start:.0f}s] round {rep}: "
            + ", ".join(f"{a}/{b}: {t_pre[(a, b)][-1]:.0f}+{t_full[(a, b)][-1]:.0f}ms"
                        for a, b in t_pre if len(t_pre[(a, b)]) == rep + 1))
    res["peft_rounds"] = peft_rounds
    pre_b = med(t_pre[("base", None)])
    dec_b = med(t_full[("base", None)]) - pre_b
    res["base_prefill_ms"], res["base_decode_ms"] = pre_b, dec_b
    denom = {k: (pre_b, dec_b) for k in sides}
    if ("base_generate", None) in t_pre:
        pre_g = med(t_pre[("base_generate", None)])
        dec_g = med(t_full[("base_generate", None)]) - pre_g
        res["base_generate_prefill_ms"], res["base_generate_decode_ms"] = pre_g, dec_g
        denom["peft"] = (pre_g, dec_g)
    for k in sides:
        p = PREFIX[k]
        for sc in scen:
            pre = med(t_pre[(k, sc)])
            dec = med(t_full[(k, sc)]) - pre
            res[f"{p}prefill_ratio_{sc}"] = pre / denom[k][0]
            res[f"{p}decode_ratio_{sc}"] = dec / denom[k][1]
            # the same ratios paired round by round (median of the per-round ratios): a slow drift
            # of the machine then cancels within each round instead of between medians; reported
            # beside the keys above, never instead of them
            base_key = ("base_generate", None) if k == "peft" and ("base_generate", None) in t_pre else ("base", None)
            rounds = list(zip(t_pre[(k, sc)], t_full[(k, sc)], t_pre[base_key], t_full[base_key]))
            res[f"{p}paired_prefill_ratio_{sc}"] = med([a / c for a, _, c, _ in rounds])
            res[f"{p}paired_decode_ratio_{sc}"] = med([(b - a) / (d - c) for a, b, c, d in rounds])
    decoders = [((PREFIX[k] or "ours_").rstrip("_"), s.decoder) for k, s in sides.items() if k != "peft"]
    for label, dec in decoders + [("base", pure_dec)]:
        if dec is not None:
            res[f"{label}_graph_captures"] = dec.captures
            res[f"{label}_graph_replays"] = sum(b["replays"] for b in dec.describe()["buckets"])
    base_bytes = param_bytes(base)
    res["base_model_bytes"] = base_bytes
    # adapter bytes at true rank in the serving dtype (ours holds them in the base weight's dtype)
    res["decode_floor_mixed_all"] = 1 + B * res["adapter_bytes"] / base_bytes
    del pure
    log(f"[{time.perf_counter() - t_start:.0f}s] partial {json.dumps(res)}")

    # ---- memory drift over load/evict cycles -------------------------------
    rng = torch.Generator().manual_seed(3)
    for k, s in sides.items():
        p = PREFIX[k]
        cycles = args.peft_cycles if k == "peft" else args.cycles
        spare = names[-1]
        s.delete(spare)
        gc.collect()
        before = live_tensor_bytes(device)
        t0 = time.perf_counter()
        done = 0
        for _ in range(cycles):  # evict a random resident adapter, load a random absent one
            if late():
                break
            done += 1
            victim = s.loaded[int(torch.randint(0, len(s.loaded), (1,), generator=rng))]
            s.delete(victim)
            absent = [n for n in names if n not in s.loaded]
            n = absent[int(torch.randint(0, len(absent), (1,), generator=rng))]
            s.load(paths[names.index(n)], n)
        start = names[:-1]
        for n in [n for n in start if n not in s.loaded]:  # back to the starting set of adapters
            s.delete(next(m for m in s.loaded if m not in start))
            s.load(paths[names.index(n)], n)
        after = live_tensor_bytes(device)
        res[p + "mem_drift_bytes"] = after - before
        res[p + "cycles_done"] = done
        res[p + "cycle_ms"] = (time.perf_counter() - t0) * 1000.0 / max(done, 1)
        log(f"[{time.perf_counter() - t_start:.0f}s] {k}: {done} cycles, drift {after - before} bytes, "
            f"{res[p + 'cycle_ms']:.1f} ms/cycle")

    if "peft_decode_ratio_mixed_all" in res:
        res["peft_over_ours_decode_mixed_all"] = res["peft_decode_ratio_mixed_all"] / res["decode_ratio_mixed_all"]
    res["wall_s"] = time.perf_counter() - t_start
    for k, v in res.items():
        if isinstance(v, float):
            res[k] = round(v, 4)
    tmp.cleanup()
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:34s} {v}")


if __name__ == "__main__":
    main()
