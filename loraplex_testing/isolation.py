"""The tenant isolation property, as a reusable check: every row of a mixed-tenant
batch gets what its prompt gets alone with its own adapter in plain PEFT — whatever
shares its batch, whichever slot its adapter sits in, and however often slots were
freed and refilled by other tenants in between.

Why logits and not a few greedy tokens: on a tiny random model a handful of greedy
tokens often agree between two adapters (measured: a third of tenant/base pairs gave
the same 5-token text), so a row served with the wrong weights would pass. Here:

1. `IsolationSetup` builds adapters and picks prompts on which every two of them
   (and the base model) provably differ (`oracle.assert_distinct`: greedy runs split
   by a logit margin, next-token logits far apart, texts different).
2. Every engine row is checked teacher-forced against PEFT alone on that row
   (`check_row`): each generated token must be PEFT's choice (up to a tie within the
   tolerance), and the engine's own per-step logits, where they can be observed
   (`LogitsProbe`: eager decoding), must match PEFT's within `tol` (rel_err).
3. The same rows, prompt + generated tokens, go through the multi-LoRA facade as one
   mixed batch (`facade_failures`): full-sequence logits per row against PEFT. With
   ``static_slots`` this forward reads its rows' slots from one persistent tensor that
   is rewritten in place between trials (`MultiLoraModel.static_batch`), the lookup a
   captured CUDA graph replays for other tenants.

Two drivers: `run_engine_trials` (an engine built with `make_engine`, adapters
loaded/deleted between batches so slots are reused by other tenants; any decode path
including ``static`` and, on a GPU, ``graphs``) and `run_service_trials` (the worker's
real request path, `LoraplexService`, on a real redis-server: every reply's status,
``adapter``, ``fallback`` and text are checked as well as the engine rows beneath it).
`bench/isolation.py` is the CLI; tests/engine/test_isolation.py and
tests/handler/test_tenant_isolation.py run them briefly.

Concurrency: one thread (engines and the oracle are single-threaded).
"""
from __future__ import annotations

import contextlib
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .oracle import PairGap, PeftOracle, assert_distinct, pair_gaps, rel_err

WORDS = ("hello world the quick brown fox jumps over lazy dog what is capital of france paris "
         "loraplex serves many tenants on one base model numbers symbols arr matey sea wide").split()
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               ("down_proj", "up_proj"))
ADAPTER_SCALE = 0.25  # A, B ~ N(0, scale): far enough from base and from each other (asserted, not assumed)
TOL = 1e-4  # rel_err of the engine's fp32 logits (CPU or CUDA) vs PEFT's (fp32 CPU); runs print max_rel_err
MIN_MARGIN = 1e-2  # relative logit gap between two models' choices where their greedy runs split
MIN_LOGIT_GAP = 0.05  # rel_err between two models' next-token logits after every prompt


# -- setup: adapters and prompts that provably differ --------------------------------------------

@dataclass
class IsolationSetup:
    model_dir: Path
    adapters: dict[str, Path]  # name -> PEFT adapter dir
    oracle: PeftOracle
    prompts: list[str]
    max_new_tokens: int
    gaps: list[PairGap] = field(default_factory=list)

    @property
    def names(self) -> list[str | None]:
        return [None, *self.adapters]

    def describe(self) -> dict:
        margins = [g.margin for g in self.gaps]
        return {"adapters": len(self.adapters), "prompts": len(self.prompts), "pairs_checked": len(self.gaps),
                "min_margin": round(min(margins), 4) if margins else None,
                "min_logit_gap": round(min(g.logit_gap for g in self.gaps), 4) if self.gaps else None}


def build_setup(workdir: Path, *, model_dir: Path | None = None, tenants: int = 6, prompts: int = 10,
                max_new_tokens: int = 8, seed: int = 0, prefix: str = "t", min_margin: float = MIN_MARGIN,
                min_logit_gap: float = MIN_LOGIT_GAP, texts: bool = True, candidates: int = 60) -> IsolationSetup:
    """A tiny Llama (unless `model_dir` is given), `tenants` random adapters of varied rank,
    alpha, targets and rsLoRA, and `prompts` prompts on which every two of them and the base
    model provably differ (`oracle.assert_distinct`; prompts that do not discriminate are
    skipped, and the chosen ones are asserted)."""
    from .models import make_random_lora, make_tiny_llama

    workdir = Path(workdir)
    rng = random.Random(seed)
    model_dir = Path(model_dir) if model_dir is not None else make_tiny_llama(workdir / "model")
    adapters = {f"{prefix}{i}": make_random_lora(model_dir, workdir / f"{prefix}-adapter{i}",
                                                 r=rng.choice([2, 4, 8, 16]), alpha=rng.choice([8, 16, 32]),
                                                 targets=TARGET_SETS[i % len(TARGET_SETS)],
                                                 use_rslora=rng.random() < 0.3, seed=100 + seed * 50 + i,
                                                 scale=ADAPTER_SCALE)
                for i in range(tenants)}
    oracle = PeftOracle(model_dir, adapters)
    names = [None, *adapters]
    chosen: list[str] = []
    for _ in range(candidates):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        if prompt in chosen:
            continue
        gaps = pair_gaps(oracle, names, [prompt], max_new_tokens)
        if all(g.diverge_at is not None and g.margin >= min_margin and g.logit_gap >= min_logit_gap
               and not (texts and g.same_text) for g in gaps):
            chosen.append(prompt)
            if len(chosen) == prompts:
                break
    if len(chosen) < prompts:
        raise AssertionError(f"only {len(chosen)} of {candidates} candidate prompts separate every pair of "
                             f"{len(names)} models; raise ADAPTER_SCALE or `candidates`")
    gaps = assert_distinct(oracle, names, chosen, max_new_tokens, min_margin=min_margin,
                           min_logit_gap=min_logit_gap, texts=texts)
    return IsolationSetup(model_dir, adapters, oracle, chosen, max_new_tokens, gaps)


# -- per-row checks ------------------------------------------------------------------------------

class LogitsProbe:
    """Records the engine's next-token logits at every forward of its model's output layer
    (a forward hook on `get_output_embeddings()`), i.e. per decode step while decoding runs
    eagerly (``generate``, ``static``). A replayed CUDA graph runs no hooks: for ``graphs``
    the probe is not used (`steps` would hold the prefill and capture only)."""

    def __init__(self, engine: Any) -> None:
        self.layer = output_layer(engine)
        self.steps: list[Any] = []

    @contextlib.contextmanager
    def record(self) -> Iterator["LogitsProbe"]:
        self.steps = []

        def hook(_module, _args, out):
            self.steps.append(out[:, -1].detach().float().cpu().clone())

        handle = self.layer.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    def row(self, j: int, n_steps: int, n_rows: int):
        """Row j's logits for its first `n_steps` tokens, or None when the forwards were not one
        per step over the whole batch of `n_rows` (fewer ran, or the engine split the batch, as
        the peft engine does per adapter)."""
        if len(self.steps) < n_steps or any(s.shape[0] < n_rows for s in self.steps):
            return None
        import torch

        return torch.stack([s[j] for s in self.steps[:n_steps]])


def output_layer(engine: Any):
    """The transformers model's output projection inside an engine (multilora or peft)."""
    todo = [engine]
    for _ in range(6):
        if not todo:
            break
        obj = todo.pop(0)
        get = getattr(obj, "get_output_embeddings", None)
        if callable(get) and get() is not None:
            return get()
        todo += [x for x in (getattr(obj, a, None) for a in ("model", "base")) if x is not None]
    raise TypeError(f"cannot find the output layer inside {type(engine).__name__}")


def multilora_facade(engine: Any):
    """The `MultiLoraModel` an engine serves through (None for other engines)."""
    from handler.engine.multilora import MultiLoraModel

    for obj in (engine, getattr(engine, "model", None)):
        if isinstance(obj, MultiLoraModel):
            return obj
    return None


def chosen_tokens(oracle: PeftOracle, tokens: Sequence[int], finish_reason: str, step_logits=None) -> list[int]:
    """The tokens the engine picked, the EOS that stopped it included (which EOS: the one its
    logits preferred, else the first of the model's)."""
    picked = list(tokens)
    if finish_reason == "stop":
        eos = sorted(oracle.eos_ids)
        if step_logits is not None and len(step_logits) > len(picked):
            eos = [max(eos, key=lambda t: float(step_logits[len(picked)][t]))]
        picked.append(eos[0])
    return picked


def check_row(oracle: PeftOracle, adapter: str | None, prompt_ids: Sequence[int], tokens: Sequence[int],
              finish_reason: str, max_new_tokens: int, *, tol: float, step_logits=None) -> tuple[list[str], float]:
    """Failures (empty = the row is right) and the largest rel_err seen, for one engine row
    served with `adapter` (None = base): teacher-forced on the engine's own tokens, every
    token must be PEFT's greedy choice (up to a tie within `tol`), the row must stop where
    PEFT would (EOS or `max_new_tokens`), and `step_logits` (if given) must match PEFT's."""
    fails: list[str] = []
    picked = chosen_tokens(oracle, tokens, finish_reason, step_logits)
    if finish_reason == "length" and len(tokens) != max_new_tokens:
        fails.append(f"{len(tokens)} tokens with finish_reason 'length' (max_new_tokens {max_new_tokens})")
    if not picked:
        return fails + ["no token generated"], 0.0
    L = len(prompt_ids)
    ref = oracle.logits(adapter, list(prompt_ids) + picked)  # [L + n, V]
    worst = 0.0
    for t, tok in enumerate(picked):
        r = ref[L - 1 + t]
        gap = float(r.max() - r[tok]) / float(r.abs().max())
        if gap > 2 * tol:
            fails.append(f"step {t}: token {tok} is {gap:.3g} below PEFT's choice {int(r.argmax())}")
            break
    if step_logits is not None:
        for t in range(len(picked)):
            err = rel_err(step_logits[t], ref[L - 1 + t])
            worst = max(worst, err)
            if err > tol:
                fails.append(f"step {t}: logits rel_err {err:.3g} > {tol}")
                break
    return fails, worst


def facade_failures(facade: Any, oracle: PeftOracle, seqs: Sequence[Sequence[int]], adapters: Sequence[str | None],
                    *, tol: float, oracle_names: Sequence[str | None] | None = None, static_slots: Any = None,
                    rank: int | None = None) -> tuple[list[list[str]], float]:
    """Full-sequence logits of every row through the multi-LoRA facade as ONE mixed batch
    (left-padded, position ids from the mask), each against PEFT on that row alone
    (`adapters`: the engine's names; `oracle_names`: the oracle's, when they differ).

    ``static_slots`` (a 1-D long tensor of at least len(seqs) rows, kept by the caller between
    calls): the rows' slots are written into it in place and the forward runs under
    `facade.static_batch(static_slots, rank)`, so each layer looks the rows' slots up in that
    tensor at run time (what a captured CUDA graph does); missing rows are base-model fillers."""
    import torch

    n = len(seqs)
    B = n if static_slots is None else int(static_slots.shape[0])
    width = max(len(s) for s in seqs)
    ids = torch.full((B, width), int(oracle.pad_id or 0), dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s))
        mask[i, width - len(s):] = 1
    mask[n:, -1] = 1  # filler rows: one real token each
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dev = facade.device
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    names = list(adapters) + [None] * (B - n)
    with torch.inference_mode():
        if static_slots is None:
            logits = facade(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=names).logits
        else:
            static_slots.copy_(torch.tensor(facade.resolve_slots(names, B), dtype=torch.long))
            with facade.static_batch(static_slots, rank if rank is not None else facade.max_rank):
                logits = facade.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logits = logits.float().cpu()
    out, worst = [], 0.0
    for i, (s, a) in enumerate(zip(seqs, oracle_names if oracle_names is not None else adapters)):
        err = rel_err(logits[i, width - len(s):], oracle.logits(a, s))
        worst = max(worst, err)
        out.append([f"facade logits rel_err {err:.3g} > {tol}"] if err > tol else [])
    return out, worst


@dataclass
class IsolationResult:
    """Counts of one run; `failures` rows failed at least one check (0 = isolation held)."""

    trials: int = 0
    rows: int = 0
    failures: int = 0
    rows_step_scored: int = 0  # rows whose per-step engine logits were compared
    rows_facade_checked: int = 0
    loads: int = 0
    evictions: int = 0
    slot_reuses: int = 0  # loads into a slot another adapter held before
    max_rel_err: float = 0.0
    examples: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def fail(self, where: dict, reasons: list[str]) -> None:
        self.failures += 1
        if len(self.examples) < 5:
            self.examples.append({**where, "reasons": reasons})

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d["max_rel_err"] = float(f"{self.max_rel_err:.3g}")
        return {**d, **self.extra}


class RowChecker:
    """Checks every row of one engine call (engine rows + outputs, the probe's logits, the facade)."""

    def __init__(self, oracle: PeftOracle, *, tol: float, score_steps: bool, facade: Any = None,
                 static_slots: Any = None, result: IsolationResult) -> None:
        self.oracle = oracle
        self.tol = tol
        self.score_steps = score_steps
        self.facade = facade
        self.static_slots = static_slots
        self.result = result
        self.slot_owner: dict[int, str] = {}  # for `track_slots`

    def track_slots(self, rows: Sequence[Any]) -> None:
        """Count slots that now hold another adapter than when last seen (service path, where
        the residency, not the driver, loads and evicts)."""
        if self.facade is None:
            return
        for name in dict.fromkeys(r.adapter for r in rows if r.adapter is not None):
            slot = self.facade.slot_of(name)
            if self.slot_owner.get(slot, name) != name:
                self.result.slot_reuses += 1
            self.slot_owner[slot] = name

    def check(self, rows: Sequence[Any], outputs: Sequence[Any], probe: LogitsProbe | None,
              oracle_name: Callable[[str | None], str | None], where: dict) -> list[bool]:
        res = self.result
        oks, seqs, names = [], [], []  # names: the oracle's
        for j, (row, out) in enumerate(zip(rows, outputs)):
            name = oracle_name(row.adapter)
            n_steps = len(out.token_ids) + (out.finish_reason == "stop")
            steps = probe.row(j, n_steps, len(rows)) if (probe is not None and self.score_steps) else None
            fails, worst = check_row(self.oracle, name, row.input_ids, out.token_ids, out.finish_reason,
                                     row.params.max_new_tokens, tol=self.tol, step_logits=steps)
            res.rows_step_scored += steps is not None
            res.max_rel_err = max(res.max_rel_err, worst)
            oks.append(not fails)
            if fails:
                res.fail({**where, "row": j, "adapter": row.adapter, "tokens": list(out.token_ids)}, fails)
            seqs.append(list(row.input_ids) + chosen_tokens(self.oracle, out.token_ids, out.finish_reason, steps))
            names.append(name)
        if self.facade is not None and seqs:
            fails_by_row, worst = facade_failures(
                self.facade, self.oracle, seqs, [r.adapter for r in rows], oracle_names=names, tol=self.tol,
                static_slots=self.static_slots)
            res.max_rel_err = max(res.max_rel_err, worst)
            res.rows_facade_checked += len(seqs)
            for j, fails in enumerate(fails_by_row):
                if fails and oks[j]:
                    oks[j] = False
                    res.fail({**where, "row": j, "adapter": rows[j].adapter, "check": "facade"}, fails)
        return oks


@contextlib.contextmanager
def wrong_slot_fault(facade: Any, *, to_base: bool = False) -> Iterator[None]:
    """Fault injection for showing a check can fail: inside the block, the first adapter row
    of every batch resolves to another loaded adapter's slot (or the base slot), as a slot
    mix-up in the engine would. Shadows `facade.resolve_slots` on this instance only."""
    orig = facade.resolve_slots

    def resolve(names, batch_size):
        slots = list(orig(names, batch_size))
        loaded = sorted({facade.slot_of(n) for n in facade.peft_config})
        for j, slot in enumerate(slots):
            if slot:
                others = [s for s in loaded if s != slot]
                slots[j] = 0 if to_base or not others else others[0]
                break
        return slots

    facade.resolve_slots = resolve
    try:
        yield
    finally:
        del facade.resolve_slots


# -- driver 1: an engine, adapters loaded and deleted between batches ---------------------------

def run_engine_trials(engine: Any, setup: IsolationSetup, trials: int, *, seed: int = 0, capacity: int = 3,
                      max_batch: int = 8, tol: float = TOL, score_steps: bool = True,
                      facade_check: bool = True, static_slots: bool = False,
                      before_generate: Callable[[Any, list], None] | None = None) -> IsolationResult:
    """`trials` random mixed batches (base rows included) through `engine.generate`, each
    row checked (`RowChecker`). Before each batch the adapters it names are made resident
    in at most `capacity` loaded adapters: the least recently used others are deleted, a
    resident one is sometimes deleted and reloaded, so slots keep being refilled by other
    tenants between batches (and, with ``decode: graphs``, between replays of one graph).
    `before_generate(engine, rows)` is a hook for fault-injection demos."""
    import torch

    rng = random.Random(seed)
    facade = multilora_facade(engine) if facade_check else None
    slots_tensor = None
    if static_slots:
        if facade is None:
            raise ValueError("static_slots needs a multilora engine")
        slots_tensor = torch.zeros(max_batch, dtype=torch.long, device=facade.device)
    res = IsolationResult()
    checker = RowChecker(setup.oracle, tol=tol, score_steps=score_steps, facade=facade, static_slots=slots_tensor,
                         result=res)
    probe = LogitsProbe(engine) if score_steps else None
    resident: "OrderedDict[str, None]" = OrderedDict((n, None) for n in engine.peft_config)  # earlier runs' loads
    slot_owner: dict[int, str] = {facade.slot_of(n): n for n in resident} if facade is not None else {}
    tenants = list(setup.adapters)

    def load(name: str) -> None:
        engine.load_adapter(str(setup.adapters[name]), name)
        resident[name] = None
        res.loads += 1
        if facade is not None:
            slot = facade.slot_of(name)
            if slot_owner.get(slot, name) != name:
                res.slot_reuses += 1
            slot_owner[slot] = name

    def evict(name: str) -> None:
        engine.delete_adapter(name)
        del resident[name]
        res.evictions += 1

    from handler.engine import GenerationRow, SamplingParams

    for trial in range(trials):
        chosen = rng.sample(tenants, rng.randint(1, min(capacity, len(tenants))))
        if resident and rng.random() < 0.3:  # the same tenant back in a fresh (maybe another) slot
            again = rng.choice(list(resident))
            evict(again)
        for name in chosen:
            if name in resident:
                resident.move_to_end(name)
                continue
            while len(resident) >= capacity:
                evict(next(n for n in resident if n not in chosen))
            load(name)
        rows = []
        for _ in range(rng.randint(1, max_batch)):
            adapter = rng.choice(chosen + [None])
            ids = setup.oracle.prompt_ids(rng.choice(setup.prompts))
            rows.append(GenerationRow(ids, adapter, SamplingParams(max_new_tokens=setup.max_new_tokens)))
        if before_generate is not None:
            before_generate(engine, rows)
        with (probe.record() if probe is not None else contextlib.nullcontext()):
            outputs = engine.generate(rows)
        checker.check(rows, outputs, probe, lambda a: a, {"trial": trial})
        res.rows += len(rows)
        res.trials += 1
    return res


def engine_for(setup: IsolationSetup, *, kind: str = "multilora", decode: str = "generate", device: str = "cpu",
               capacity: int = 3, lora_backend: str = "auto"):
    """An engine over the setup's base model with room for `capacity` adapters (+ the base slot)."""
    import torch
    from transformers import AutoModelForCausalLM

    from handler.engine import EngineSettings, make_engine

    model = AutoModelForCausalLM.from_pretrained(str(setup.model_dir), dtype=torch.float32).to(device).eval()
    settings = EngineSettings(num_slots=capacity + 1, max_rank=64, decode=decode, lora_backend=lora_backend)
    tok = setup.oracle.tokenizer
    return make_engine(kind, model, settings, eos_token_ids=sorted(setup.oracle.eos_ids),
                       pad_token_id=int(tok.pad_token_id))


# -- driver 2: the worker's request path -----------------------------------------------------------

def run_service_trials(trials: int, *, redis_url: str, workdir: Path, seed: int = 0, tenants: int = 6,
                       capacity: int = 2, max_batch: int = 8, engine: str = "multilora", decode: str = "auto",
                       tol: float = TOL, setup: IsolationSetup | None = None,
                       before_trials: Callable[[Any], None] | None = None) -> IsolationResult:
    """`trials` random batches through `LoraplexService.handle_batch` (registry in the given
    redis-server, adapter store, residency with `capacity` resident adapters for `tenants`
    tenants, so adapters are evicted and reloaded between batches). Every reply must be 200
    with ``adapter`` = the tenant's ``<tenant>@v1`` (or ``base``), ``fallback`` = None (or
    ``no_tenant`` for rows without a tenant) and PEFT's text; every engine row beneath it
    passes `RowChecker` (logits per step, teacher-forced tokens, facade logits).
    `before_trials(service)` is a hook for fault-injection demos."""
    from handler.service import LoraplexService, RawRequest
    from loraplex_common.config import LoraplexConfig
    from tenant_registry.onboarding import onboard
    from tenant_registry.validate import BaseModelSpec

    workdir = Path(workdir)
    setup = setup or build_setup(workdir, tenants=tenants, seed=seed)
    rng = random.Random(seed)
    cfg = LoraplexConfig.from_mapping({
        "redis_url": redis_url, "redis_prefix": f"iso{seed}-{int(time.time() * 1000)}",
        "adapter_store": str(workdir / "store"), **capacity_setting(capacity), "engine": engine,
        "decode": decode, "max_new_tokens_cap": 64, "max_prompt_tokens": 128,
        "scheduler": "static"})  # the engine-level checks watch `generate` calls (the static path)
    svc = LoraplexService.from_model_dir(setup.model_dir, cfg)
    spec = BaseModelSpec.from_model_dir(setup.model_dir)
    for name, path in setup.adapters.items():
        onboard(svc.registry, svc.store, spec, name, path, cfg)
    res = IsolationResult()
    eng = svc.engine
    score = getattr(eng, "decode", "generate") != "graphs"
    checker = RowChecker(setup.oracle, tol=tol, score_steps=score, facade=multilora_facade(eng), result=res)
    probe = LogitsProbe(eng)
    inner = eng.generate
    where: dict = {}

    def checked_generate(rows):  # runs inside the service's lease: the rows' adapters are loaded
        checker.track_slots(rows)
        with probe.record():
            outputs = inner(rows)
        checker.check(rows, outputs, probe, tenant_of_adapter, {**where, "level": "engine"})
        return outputs

    eng.generate = checked_generate  # instance attribute: this service's engine only
    try:
        if before_trials is not None:
            before_trials(svc)
        for trial in range(trials):
            where["trial"] = trial
            batch, asked = [], []
            for _ in range(rng.randint(1, max_batch)):
                tenant = rng.choice([*setup.adapters, None])
                prompt = rng.choice(setup.prompts)
                headers = {"X-Tenant-ID": tenant} if tenant else {}
                batch.append(RawRequest({"prompt": prompt, "max_new_tokens": setup.max_new_tokens}, headers))
                asked.append((tenant, prompt))
            for j, (reply, (tenant, prompt)) in enumerate(zip(svc.handle_batch(batch), asked)):
                res.rows += 1
                fails = reply_failures(reply.status, reply.body, tenant, setup.oracle.text(
                    tenant, prompt, setup.max_new_tokens))
                if fails:
                    res.fail({"trial": trial, "row": j, "tenant": tenant, "prompt": prompt, "level": "reply",
                              "got": reply.body}, fails)
            res.trials += 1
        counters = svc.describe()["counters"]
    finally:
        svc.stop()
    res.loads, res.evictions = counters["loads"], counters["evictions_lru"]
    res.extra = {"tenants": len(setup.adapters), "capacity": capacity, "engine": engine,
                 "decode": getattr(eng, "decode", "generate"), **setup.describe()}
    return res


def capacity_setting(capacity: int) -> dict:
    """The config that gives a worker `capacity` resident adapters (slot 0 is the base model,
    `SPARE_SLOTS` the spare the residency loads into before evicting)."""
    from loraplex_common.config import SPARE_SLOTS

    return {"num_slots": capacity + 1 + SPARE_SLOTS}


def tenant_of_adapter(adapter_id: str | None) -> str | None:
    """The worker names a tenant's adapter ``<tenant>@v<N>``; None is the base model."""
    return None if adapter_id is None else adapter_id.split("@", 1)[0]


def reply_failures(status: int, body: Any, tenant: str | None, want_text: str) -> list[str]:
    """What is wrong with one reply to a tenant (None = no tenant) whose PEFT text is `want_text`."""
    if status != 200 or not isinstance(body, dict):
        return [f"status {status}"]
    fails = []
    want_adapter = f"{tenant}@v1" if tenant else "base"
    if body.get("adapter") != want_adapter:
        fails.append(f"adapter {body.get('adapter')!r}, want {want_adapter!r}")
    want_fallback = None if tenant else "no_tenant"
    if body.get("fallback") != want_fallback:
        fails.append(f"fallback {body.get('fallback')!r}, want {want_fallback!r}")
    if body.get("text") != want_text:
        fails.append(f"text {body.get('text')!r}, want {want_text!r}")
    return fails
