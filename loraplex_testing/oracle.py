"""The oracle every engine result is judged against: plain transformers (+ PEFT), one
prompt alone.

`reference_generate` is the one-shot form (greedy tokens). `PeftOracle` keeps one PEFT
model with many adapters and answers per row: greedy tokens, teacher-forced logits of a
whole sequence, text. `assert_distinct` proves that a set of adapters (and the base
model) give different answers on a set of prompts, so that a check built on them can
see a row served with the wrong adapter.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


def reference_generate(base_dir: Path, adapter_dir: Path | None, input_ids: Sequence[int],
                       max_new_tokens: int) -> list[int]:
    """The oracle: plain transformers (+ PEFT when an adapter is given), one prompt alone,
    greedy; new tokens up to (not including) the first EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    ids = torch.tensor([list(input_ids)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    for i, t in enumerate(new):
        if t in eos_ids:
            return new[:i]
    return new


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (both cast to fp32): the logits comparison every oracle check uses."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class PeftOracle:
    """Plain PEFT with every adapter loaded under its name; every call runs ONE row alone.

    Why one model for all adapters: loading PEFT once per adapter per prompt would
    dominate a test. Each call still sees a single row with a single adapter (or the
    base model, `adapter=None`), which is what "the prompt run alone with its
    tenant's adapter" means. Results are cached by (adapter, ids).

    - `greedy(adapter, ids, n)`: new tokens up to (not including) the first EOS,
      exactly `reference_generate`'s answer.
    - `logits(adapter, ids)`: teacher-forced fp32 logits ``[len(ids), vocab]`` of the
      whole sequence (row ``t`` scores the token after position ``t``).
    - `token_logprobs(adapter, prompt_ids, tokens)`: teacher-forced log-probabilities of
      the distributions each of `tokens` was picked from.
    - `text(adapter, prompt, n)`: the greedy text of the new tokens.

    Not thread-safe (tests call it from one thread).
    """

    def __init__(self, base_dir: Path, adapters: Mapping[str, Path], *, dtype=None, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir = Path(base_dir)
        self.adapters = dict(adapters)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or torch.float32).to(device).eval()
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = model.config.pad_token_id
        self.device = device
        if self.adapters:
            from peft import PeftModel

            names = list(self.adapters)
            model = PeftModel.from_pretrained(model, str(self.adapters[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(self.adapters[name]), adapter_name=name)
        self.model = model.eval()
        self._greedy: dict[tuple, list[int]] = {}
        self._logits: dict[tuple, Any] = {}

    def _use(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        if adapter not in self.adapters:
            raise KeyError(f"oracle has no adapter {adapter!r} (has {sorted(self.adapters)})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def greedy(self, adapter: str | None, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        key = (adapter, tuple(input_ids), max_new_tokens)
        if key not in self._greedy:
            import torch

            ids = torch.tensor([list(input_ids)], device=self.device)
            with torch.no_grad(), self._use(adapter):
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
            new = out[0, ids.shape[1]:].tolist()
            for i, t in enumerate(new):
                if t in self.eos_ids:
                    new = new[:i]
                    break
            self._greedy[key] = new
        return list(self._greedy[key])

    def logits(self, adapter: str | None, input_ids: Sequence[int]):
        key = (adapter, tuple(input_ids))
        if key not in self._logits:
            import torch

            ids = torch.tensor([list(input_ids)], device=self.device)
            with torch.no_grad(), self._use(adapter):
                self._logits[key] = self.model(input_ids=ids).logits[0].float().cpu()
        return self._logits[key]

    def token_logprobs(self, adapter: str | None, prompt_ids: Sequence[int], tokens: Sequence[int]):
        """Teacher-forced fp32 log-probabilities ``[len(tokens), vocab]``: row ``t`` is
        log_softmax of the logits after ``prompt_ids + tokens[:t]``, the distribution
        ``tokens[t]`` was drawn from (raw logits: no temperature or top-p)."""
        import torch

        n = len(prompt_ids)
        logits = self.logits(adapter, list(prompt_ids) + list(tokens))
        return torch.log_softmax(logits[n - 1: n - 1 + len(tokens)], dim=-1)

    def text(self, adapter: str | None, prompt: str, max_new_tokens: int) -> str:
        return self.tokenizer.decode(self.greedy(adapter, self.prompt_ids(prompt), max_new_tokens),
                                     skip_special_tokens=True)

    def prompt_ids(self, prompt: str) -> list[int]:
        """How the worker tokenizes a raw `prompt` (special tokens added)."""
        return [int(t) for t in self.tokenizer(prompt, add_special_tokens=True)["input_ids"]]


@dataclass(frozen=True)
class PairGap:
    """How far apart two models' (adapters' or base's) greedy runs of one prompt are."""

    a: str | None
    b: str | None
    prompt: str
    diverge_at: int | None  # first new-token index where their greedy tokens differ (None: never)
    margin: float  # at that step: min over the two of (own choice - other's choice) / max |logit|
    logit_gap: float  # rel_err of their next-token logits right after the prompt
    same_text: bool


def pair_gaps(oracle: PeftOracle, names: Sequence[str | None], prompts: Sequence[str],
              max_new_tokens: int) -> list[PairGap]:
    """Every pair of `names` (None = base) on every prompt: where their greedy runs split and by how much."""
    gaps = []
    for prompt in prompts:
        ids = oracle.prompt_ids(prompt)
        runs = {n: oracle.greedy(n, ids, max_new_tokens) for n in names}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ra, rb = runs[a], runs[b]
                k = next((t for t, (x, y) in enumerate(zip(ra, rb)) if x != y), None)
                if k is None and len(ra) != len(rb):
                    k = min(len(ra), len(rb))  # one stopped (EOS) where the other went on
                margin = 0.0
                if k is not None:
                    prefix = ids + ra[:k]
                    la, lb = oracle.logits(a, prefix)[-1], oracle.logits(b, prefix)[-1]
                    ta = ra[k] if k < len(ra) else _eos(oracle, la)
                    tb = rb[k] if k < len(rb) else _eos(oracle, lb)
                    margin = min(float(la[ta] - la[tb]) / float(la.abs().max()),
                                 float(lb[tb] - lb[ta]) / float(lb.abs().max()))
                gap = rel_err(oracle.logits(a, ids)[-1], oracle.logits(b, ids)[-1])
                same_text = (oracle.tokenizer.decode(ra, skip_special_tokens=True)
                             == oracle.tokenizer.decode(rb, skip_special_tokens=True))
                gaps.append(PairGap(a, b, prompt, k, margin, gap, same_text))
    return gaps


def assert_distinct(oracle: PeftOracle, names: Sequence[str | None], prompts: Sequence[str], max_new_tokens: int,
                    *, min_margin: float, min_logit_gap: float, texts: bool = True) -> list[PairGap]:
    """Fail unless, on every prompt, every two of `names` (None = base) give different greedy
    tokens, split by at least `min_margin` (relative logit gap between the two choices at the
    first differing step, under both models), with next-token logits at least
    `min_logit_gap` apart (rel_err), and (``texts``) different texts. Then a row served with
    another adapter's weights, or the base model's, cannot pass a check of its tokens, its
    logits or its text. Returns the gaps (for reports)."""
    gaps = pair_gaps(oracle, names, prompts, max_new_tokens)
    bad = [g for g in gaps if g.diverge_at is None or g.margin < min_margin or g.logit_gap < min_logit_gap
           or (texts and g.same_text)]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(gaps)} (adapter, adapter, prompt) triples are not provably "
                             f"distinct (margin >= {min_margin}, logit gap >= {min_logit_gap}); first: {bad[:3]}")
    return gaps


def _eos(oracle: PeftOracle, logits) -> int:
    return max(oracle.eos_ids, key=lambda t: float(logits[t]))
