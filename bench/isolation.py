"""Tenant isolation property check: randomized mixed-tenant batches through the
worker's real request path (LoraplexService: registry in a real redis-server,
adapter store, residency with a capacity small enough to force eviction and
reload between batches, the multi-LoRA engine). Every row's greedy output must
equal that prompt run alone with its tenant's adapter in plain PEFT.

    python bench/isolation.py --trials 1000 --json

The last line is one JSON object with `trials`, `rows`, `mismatches`, ... .
`tests/handler/test_tenant_isolation.py` runs the same check with fewer trials in CI.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

WORDS = ("hello world the quick brown fox jumps over lazy dog what is capital of france paris "
         "loraplex serves many tenants on one base model numbers symbols arr matey sea wide").split()


class Oracle:
    """Plain PEFT with every tenant's adapter loaded; one prompt at a time, greedy."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], max_new_tokens: int) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0]).eval()
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.max_new = max_new_tokens
        self.eos = self.tok.eos_token_id
        self._cache: dict[tuple[str | None, str], str] = {}

    def answer(self, tenant: str | None, prompt: str) -> str:
        key = (tenant, prompt)
        if key not in self._cache:
            import torch

            ids = torch.tensor([self.tok(prompt)["input_ids"]])
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new,
                          do_sample=False, pad_token_id=self.tok.pad_token_id)
            with torch.no_grad():
                if tenant is None:
                    with self.model.disable_adapter():
                        out = self.model.generate(**kwargs)
                else:
                    self.model.set_adapter(tenant)
                    out = self.model.generate(**kwargs)
            new = out[0, ids.shape[1]:].tolist()
            if self.eos in new:
                new = new[:new.index(self.eos)]
            self._cache[key] = self.tok.decode(new, skip_special_tokens=True)
        return self._cache[key]


def run_trials(trials: int, *, redis_url: str, workdir: Path, seed: int = 0, tenants: int = 6,
               capacity: int = 2, max_batch: int = 8, max_new_tokens: int = 5, engine: str = "multilora") -> dict:
    """Run `trials` random batches; returns counts and the first mismatches."""
    from handler.service import LoraplexService, RawRequest
    from loraplex_testing.models import make_random_lora, make_tiny_llama
    from loraplex_common.config import LoraplexConfig
    from tenant_registry.onboarding import onboard
    from tenant_registry.validate import BaseModelSpec

    rng = random.Random(seed)
    model_dir = make_tiny_llama(workdir / "model")
    targets = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), ("down_proj", "up_proj")]
    adapters = {f"t{i}": make_random_lora(model_dir, workdir / f"a{i}", r=rng.choice([2, 4, 8, 16]),
                                          alpha=rng.choice([4, 8, 16, 32]), targets=rng.choice(targets),
                                          use_rslora=rng.random() < 0.3, seed=100 + i)
                for i in range(tenants)}
    cfg = LoraplexConfig.from_mapping({
        "redis_url": redis_url, "redis_prefix": f"iso{seed}-{int(time.time() * 1000)}",
        "adapter_store": str(workdir / "store"), "num_slots": capacity + 2, "engine": engine,
        "max_new_tokens_cap": 64, "max_prompt_tokens": 128})
    svc = LoraplexService.from_model_dir(model_dir, cfg)
    spec = BaseModelSpec.from_model_dir(model_dir)
    for name, path in adapters.items():
        onboard(svc.registry, svc.store, spec, name, path, cfg)
    oracle = Oracle(model_dir, adapters, max_new_tokens)
    rows = mismatches = 0
    examples: list[dict] = []
    try:
        for _ in range(trials):
            batch, expected = [], []
            for _ in range(rng.randint(1, max_batch)):
                tenant = rng.choice(list(adapters) + [None])
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                headers = {"X-Tenant-ID": tenant} if tenant else {}
                batch.append(RawRequest({"prompt": prompt, "max_new_tokens": max_new_tokens}, headers))
                expected.append((tenant, prompt, oracle.answer(tenant, prompt)))
            for reply, (tenant, prompt, want) in zip(svc.handle_batch(batch), expected):
                rows += 1
                got_adapter = reply.body.get("adapter")
                ok = (reply.status == 200 and reply.body.get("text") == want
                      and got_adapter == (f"{tenant}@v1" if tenant else "base"))
                if not ok:
                    mismatches += 1
                    if len(examples) < 5:
                        examples.append({"tenant": tenant, "prompt": prompt, "want": want, "got": reply.body})
        counters = svc.describe()["counters"]
    finally:
        svc.stop()
    return {"trials": trials, "rows": rows, "mismatches": mismatches, "tenants": tenants, "capacity": capacity,
            "engine": engine, "loads": counters["loads"], "evictions": counters["evictions_lru"],
            "examples": examples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="randomized mixed-tenant isolation check against PEFT")
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["multilora", "peft"], default="multilora")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # tiny model: one thread is fastest and steadiest
    from loraplex_testing.services import redis_server

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="loraplex-iso-") as tmp, redis_server() as (url, _):
        result = run_trials(args.trials, redis_url=url, workdir=Path(tmp), seed=args.seed, engine=args.engine)
    result["seconds"] = round(time.time() - start, 1)
    if not args.json:
        print(f"{result['trials']} trials, {result['rows']} rows, {result['mismatches']} mismatches, "
              f"{result['loads']} loads, {result['evictions']} evictions in {result['seconds']} s")
    print(json.dumps(result))
    return 0 if result["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
