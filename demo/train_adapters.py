"""Train the demo tenants' LoRA adapters (pirate, shouty, robot) for SmolLM2 on the CPU.

Why: the demo needs a few adapters whose effect on a chat answer is obvious at
a glance, and no model hub or dataset is reachable. So the training data is
made here: a fixed list of short user questions, the base model's own greedy
answers to them (generated once, cached), and a deterministic text transform
per adapter (pirate speak, ALL CAPS, a robot's "BEEP BOOP."). Because the
adapters only learn a *style* on top of the base model's own answers, a few
dozen LoRA steps suffice and the content of the answers stays the base
model's.

Usage::

    python demo/train_adapters.py --base-model DIR --out DIR [--only NAME ...] [--steps N] [--force]

Each adapter is written by PEFT (``adapter_config.json`` +
``adapter_model.safetensors``) into ``<out>/<name>/``, next to a hidden stamp
file (``.train_stamp.json``) that records the hash of the training recipe.
A later run whose recipe hash matches skips that adapter, so a second
``make demo`` costs nothing. ``--force`` retrains.

Cost on 2 CPU cores: ~50 s once for the base answers (cached in
``<out>/.base_answers.json``), then ~45-60 s per adapter (32 steps of 8
examples, bf16 autocast where the CPU has native bf16, else fp32; only the
top 12 layers trained: see "training" below); a fully cached run takes a
few seconds. Training is seeded and deterministic on a given machine. The shouty adapter stays in capitals, but
its content is weaker than the others': the 135M base model knows little in
upper-case tokens (asked to continue "THE CAPITAL OF FRANCE IS" it says
"LONDON").

The core functions (``build_dataset``, ``train_adapter``) take a model
directory, so the tests run them on a tiny random Llama.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_CACHE = Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))
DEFAULT_BASE = DEFAULT_CACHE / "smollm2-135m-instruct"
DEFAULT_OUT = DEFAULT_CACHE / "demo-adapters"
BASE_MODEL_NAME = "SmolLM2-135M-Instruct"  # written into adapter_config.json
STAMP_NAME = ".train_stamp.json"
BASE_ANSWERS_NAME = ".base_answers.json"
RECIPE_VERSION = 1  # bump to invalidate every cached adapter

# --------------------------------------------------------------------------- data

TRAIN_QUESTIONS: list[str] = [
    "Hello! How are you today?",
    "Hi there, can you help me?",
    "What is the capital of Germany?",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is photosynthesis?",
    "Why is the sky blue?",
    "How many days are in a week?",
    "What is the largest ocean on Earth?",
    "How do I bake bread?",
    "What is a black hole?",
    "Can you recommend a good book?",
    "What should I eat for breakfast?",
    "How do plants grow?",
    "What is the tallest mountain in the world?",
    "What does a doctor do?",
    "Tell me a fun fact about cats.",
    "What is your name?",
    "How can I sleep better at night?",
    "What is the moon made of?",
    "Why do birds fly south in winter?",
    "What is the best way to learn a new language?",
    "How does rain form?",
    "What is a rainbow?",
    "Give me some advice for a job interview.",
    "What is the speed of light?",
    "How do I make friends in a new city?",
    "What is music?",
    "Why is exercise important?",
    "What is a volcano?",
    "How do airplanes fly?",
    "What is the internet?",
    "Tell me something about the ocean.",
    "What is the meaning of friendship?",
    "How do I save money?",
    "What is gravity?",
    "Who was Albert Einstein?",
    "What is a good name for a dog?",
    "How do bees make honey?",
    "What is the weather like on Mars?",
    "Can you tell me a joke?",
    "What is a good hobby to start?",
    "How do I stay calm when I am stressed?",
    "What is a library?",
    "Why do we need water?",
    "What is the difference between a frog and a toad?",
    "How do I write a good essay?",
    "What is a dinosaur?",
    "What makes a good teacher?",
    "How does a car engine work?",
    "What is your favorite food?",
    "What is the longest river in the world?",
    "How can I be more productive?",
    "What is chocolate made from?",
    "Why do leaves change color in autumn?",
    "What is an island?",
    "How do I take care of a plant?",
    "What is the biggest animal on Earth?",
    "Thank you for your help!",
    "What is a smartphone?",
    "How do fish breathe underwater?",
    "What is a good way to spend a weekend?",
    "What are stars?",
    "How do I learn to cook?",
    "What is a tree?",
    "How do magnets work?",
    "What is the best way to study for an exam?",
    "Why do cats purr?",
    "What is a museum?",
    "How do I tie my shoes?",
    "What is electricity?",
    "Who was Leonardo da Vinci?",
    "What is a good gift for my mother?",
    "How far away is the moon?",
    "What is a pizza?",
    "Why do we dream?",
    "What is the color of grass?",
    "How do I start running?",
    "What is a robot?",
    "What is the sun made of?",
    "Can you describe a beach?",
    "What is a good breakfast for kids?",
    "How do trains work?",
    "What is math?",
    "Why is reading important?",
    "What is a cloud?",
    "How do I be a good friend?",
    "What is snow?",
    "What do pandas eat?",
    "What is a city?",
    "How do I clean my room quickly?",
    "What is the history of the bicycle?",
    "What is a poem?",
    "Why do people laugh?",
    "What is the ocean's deepest point?",
    "How can I make my garden beautiful?",
    "What is a planet?",
    "What is a healthy snack?",
    "Who invented the telephone?",
    "What is a desert?",
    "How do I plan a trip?",
    "What is art?",
    "Why do dogs wag their tails?",
    "What is the fastest animal?",
    "How do I write a letter?",
    "What is a forest?",
    "What is coffee?",
    "How do I remember things better?",
    "What is a good movie to watch?",
    "Why do we have seasons?",
    "What is a river?",
    "How does the heart work?",
    "What is kindness?",
    "What is a castle?",
    "How do I learn to swim?",
    "What is an apple?",
    "Why is the ocean salty?",
    "What is a festival?",
    "Good morning! What should I do today?",
    "What is a ship?",
]

# Never trained on: used to show (and check) that the style generalises.
HELDOUT_QUESTIONS: list[str] = [
    "What is the capital of France?",
    "Give me a tip for staying healthy.",
    "What is a computer?",
    "How do I make a cup of tea?",
]


def _match_case(src: str, repl: str) -> str:
    if src.isupper() and len(src) > 1:
        return repl.upper()
    if src[:1].isupper():
        return repl[:1].upper() + repl[1:]
    return repl


PIRATE_WORDS = {
    "hello": "ahoy", "hi": "ahoy", "hey": "ahoy",
    "you're": "ye be", "you": "ye", "your": "yer", "yours": "yers", "yourself": "yerself",
    "my": "me", "is": "be", "are": "be", "am": "be", "isn't": "ain't",
    "friend": "matey", "friends": "mateys", "yes": "aye", "money": "doubloons",
    "of": "o'", "for": "fer",
}
_PIRATE_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, PIRATE_WORDS), key=len, reverse=True)) + r")\b",
                        re.IGNORECASE)


def _end_sentence(text: str) -> str:
    text = text.strip()
    return text if text[-1:] in ".!?" else text + "."


def to_pirate(answer: str) -> str:
    """'Hello, my friend, the sea is wide.' -> 'Arr, matey! Ahoy, me matey, the sea be wide. Arr!'"""
    body = _PIRATE_RE.sub(lambda m: _match_case(m.group(0), PIRATE_WORDS[m.group(0).lower()]), answer)
    return f"Arr, matey! {_end_sentence(body)} Arr!"


def to_shouty(answer: str) -> str:
    """ALL CAPITALS, and every full stop becomes an exclamation mark."""
    return re.sub(r"\.(?=\s|$)", "!", _end_sentence(answer).upper())


def to_robot(answer: str) -> str:
    """'BEEP BOOP. <answer> BEEP BOOP.'"""
    return f"BEEP BOOP. {_end_sentence(answer)} BEEP BOOP."


@dataclass(frozen=True)
class Recipe:
    """How one adapter is trained; everything here feeds the cache hash."""

    transform: Callable[[str], str]
    steps: int = 32
    lr: float = 2e-3
    r: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    batch_size: int = 8
    warmup: int = 4
    train_layers: int = 12  # LoRA is trained in the top this-many decoder layers only (see "training")
    seed: int = 1234


RECIPES: dict[str, Recipe] = {
    "pirate": Recipe(to_pirate),
    "shouty": Recipe(to_shouty),
    "robot": Recipe(to_robot),
}

# The base answers the transforms start from: greedy, then cut to <= 2 whole
# sentences and <= ANSWER_TOKENS tokens so the adapters also learn to be brief
# (and the pirate's closing "Arr!" fits into a 40-token reply).
GEN_TOKENS = 56
ANSWER_TOKENS = 40
ANSWER_SENTENCES = 2
EVAL_EXAMPLES = 32

# --------------------------------------------------------------------------- helpers


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, file=sys.stderr, **kw)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_base(model_dir: Path | str):
    """(tokenizer, float32 causal LM in eval mode) from a plain model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return tok, model


def prompt_ids(tok, question: str) -> list[int]:
    """Token ids of the chat prompt for one user turn, ending where the assistant starts."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizer versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def generate(model, tok, questions: Sequence[str], *, max_new_tokens: int = 40, batch_size: int = 16,
             desc: str | None = None) -> list[str]:
    """Greedy answers (decoded, stripped), batched with left padding."""
    import torch

    out: list[str] = []
    batches = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    it = _progress(batches, desc=desc, unit="batch", leave=False) if desc else batches
    for qs in it:
        rows = [prompt_ids(tok, q) for q in qs]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in gen[:, width:]:
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


def trim_answer(tok, text: str, max_tokens: int = ANSWER_TOKENS, max_sentences: int = ANSWER_SENTENCES) -> str:
    """At most `max_sentences` whole sentences and `max_tokens` tokens; never empty."""
    text = " ".join(text.split())
    # "Here's a simple guide: 1." -> "Here's a simple guide." (a list the cut would leave dangling)
    sentences = [re.sub(r":\s*\d+\.$", ".", s) for s in re.split(r"(?<=[.!?])\s+", text) if s]
    kept = ""
    for s in sentences[:max_sentences]:
        cand = f"{kept} {s}".strip()
        if len(tok(cand, add_special_tokens=False)["input_ids"]) > max_tokens:
            break
        kept = cand
    if not kept:  # the first sentence alone is too long (or there is none): cut at a word boundary
        words = text.split()
        while words and len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) > max_tokens - 1:
            words = words[:-1]
        kept = " ".join(words).rstrip(",;:-") or "I do not know"
    return _end_sentence(kept)


def model_fingerprint(model_dir: Path | str) -> str:
    """Cheap identity of a model dir: config, tokenizer, and the weights' header, size, head and tail."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        p = model_dir / name
        if p.exists():
            h.update(name.encode() + p.read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def base_answers(model_dir: Path | str, questions: Sequence[str], *, cache_file: Path | None = None,
                 model_and_tok=None) -> list[str]:
    """The base model's trimmed greedy answers to `questions`, cached in `cache_file` (JSON) if given."""
    key = hashlib.sha256(json.dumps([model_fingerprint(model_dir), list(questions), GEN_TOKENS, ANSWER_TOKENS,
                                     ANSWER_SENTENCES, inspect.getsource(trim_answer)]).encode()).hexdigest()
    if cache_file is not None and cache_file.exists():
        try:
            data = json.loads(cache_file.read_text())
            if data.get("key") == key:
                return list(data["answers"])
        except (ValueError, KeyError):
            pass
    tok, model = model_and_tok or load_base(model_dir)
    raw = generate(model, tok, questions, max_new_tokens=GEN_TOKENS, desc="base answers")
    answers = [trim_answer(tok, a) for a in raw]
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "questions": list(questions), "answers": answers}, indent=1))
        tmp.replace(cache_file)
    return answers


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: the loss is on the assistant's reply (and its end token) only


def build_dataset(tok, questions: Sequence[str], answers: Sequence[str],
                  transform: Callable[[str], str]) -> list[Example]:
    """Chat-template examples: prompt (system + user + assistant header) -> transform(answer) + EOS."""
    examples = []
    for q, a in zip(questions, answers, strict=True):
        p = prompt_ids(tok, q)
        reply = tok(transform(a), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append(Example(p + reply, [-100] * len(p) + reply))
    return examples


def recipe_hash(name: str, recipe: Recipe, model_dir: Path | str, questions: Sequence[str],
                base_model_name: str, bf16: bool = True) -> str:
    fields = {k: v for k, v in asdict(recipe).items() if k != "transform"}
    blob = json.dumps({
        "version": RECIPE_VERSION, "name": name, "recipe": fields,
        "transform": inspect.getsource(recipe.transform),
        "helpers": [inspect.getsource(f) for f in (_end_sentence, _match_case, build_dataset, trim_answer,
                                                   _train_loop, _loss, _cache_inputs)] + [PIRATE_WORDS],
        "gen": [GEN_TOKENS, ANSWER_TOKENS, ANSWER_SENTENCES],
        "questions": list(questions), "model": model_fingerprint(model_dir), "base_model_name": base_model_name,
        "bf16": bf16,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_cached(adapter_dir: Path, rhash: str) -> bool:
    stamp = adapter_dir / STAMP_NAME
    if not all((adapter_dir / f).exists() for f in ("adapter_model.safetensors", "adapter_config.json", STAMP_NAME)):
        return False
    try:
        return json.loads(stamp.read_text()).get("recipe_hash") == rhash
    except ValueError:
        return False


# --------------------------------------------------------------------------- training
#
# Speed: only the LoRA weights of the top `train_layers` decoder layers are
# trained; the lower layers' LoRA stay at PEFT's init (B = 0, an exact no-op).
# So the hidden state entering the first trained layer is a constant of each
# example: it is computed once, and every step runs (forward and backward)
# through the top layers only, with the LM head on the reply positions only.
# That is ~3x cheaper per step than a full pass. The saved adapter still covers
# every layer (a plain PEFT LoRA any loader takes); the lower ones are zeros.


@contextlib.contextmanager
def _only_layers(inner, start: int, stop: int, final_norm: bool = True):
    """Temporarily make `inner` (a LlamaModel) run decoder layers [start, stop) only."""
    import torch

    layers, norm = inner.layers, inner.norm
    inner.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        inner.norm = torch.nn.Identity()
    n = inner.config.num_hidden_layers
    inner.config.num_hidden_layers = stop - start
    try:
        yield inner
    finally:
        inner.layers, inner.norm, inner.config.num_hidden_layers = layers, norm, n


def _pad(rows, value, width: int):
    import torch

    return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[0]), value=value)
                        if r.dim() == 2 else torch.nn.functional.pad(r, (0, width - r.shape[0]), value=value)
                        for r in rows])


@dataclass
class _Cached:
    hidden: "object"  # [len, hidden] float32: the input of the first trained layer
    labels: "object"  # [len] int64


def _cache_inputs(causal_lm, examples: Sequence[Example], first: int, pad_id: int,
                  batch_size: int = 16) -> list[_Cached]:
    """Run the frozen lower layers [0, first) once per example."""
    import torch

    inner = causal_lm.model
    out = []
    with torch.no_grad(), _only_layers(inner, 0, first, final_norm=False):
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in batch])
            mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
            h = inner(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            out += [_Cached(h[j, :len(e.input_ids)].clone(), torch.tensor(e.labels)) for j, e in enumerate(batch)]
    return out


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles): without it bf16 autocast
    is emulated, and a training step costs ~30x its fp32 time (an AMD EPYC without AVX-512:
    54 s a step)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _use_bf16(args: argparse.Namespace) -> bool:
    if args.fp32 or args.precision == "fp32":
        return False
    return args.precision == "bf16" or native_bf16()


def _loss(causal_lm, batch: Sequence[_Cached], first: int, bf16: bool):
    """Mean next-token loss on the reply positions, running layers [first, N) on the cached inputs."""
    import torch
    import torch.nn.functional as F

    width = max(c.hidden.shape[0] for c in batch)
    hidden = _pad([c.hidden for c in batch], 0.0, width)
    labels = _pad([c.labels for c in batch], -100, width)
    mask = _pad([torch.ones(c.hidden.shape[0], dtype=torch.long) for c in batch], 0, width)
    inner = causal_lm.model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            _only_layers(inner, first, len(inner.layers)):
        out = inner(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        logits = causal_lm.lm_head(out[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep])


def _mean_loss(causal_lm, data: Sequence[_Cached], first: int, bf16: bool, batch_size: int = 16) -> float:
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            batch = data[i:i + batch_size]
            k = sum(int((c.labels[1:] != -100).sum()) for c in batch)
            total += float(_loss(causal_lm, batch, first, bf16)) * k
            n += k
    return total / max(n, 1)


def _train_loop(peft_model, data: Sequence[_Cached], recipe: Recipe, steps: int, first: int, bf16: bool,
                desc: str) -> list[float]:
    import torch

    causal_lm = peft_model.get_base_model()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warm = min(recipe.warmup, max(steps - 1, 0))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine down to 10 %
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(steps - warm, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order_rng = random.Random(recipe.seed)
    order: list[int] = []
    losses: list[float] = []
    peft_model.train()
    bar = _progress(range(steps), desc=desc, unit="step")
    for _ in bar:
        if len(order) < recipe.batch_size:  # epochs of shuffled examples
            perm = list(range(len(data)))
            order_rng.shuffle(perm)
            order += perm
        batch = [data[i] for i in order[:recipe.batch_size]]
        del order[:recipe.batch_size]
        loss = _loss(causal_lm, batch, first, bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    peft_model.eval()
    return losses


def _freeze_below(peft_model, first: int) -> None:
    """Only LoRA weights in decoder layers >= first stay trainable."""
    for name, p in peft_model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if p.requires_grad and m and int(m.group(1)) < first:
            p.requires_grad_(False)


@dataclass
class TrainResult:
    name: str
    path: Path
    skipped: bool
    recipe_hash: str
    loss_before: float | None = None
    loss_after: float | None = None
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples: list[tuple[str, str]] = field(default_factory=list)  # (held-out question, adapter answer)


def train_adapter(model_dir: Path | str, out_root: Path | str, name: str, *, recipe: Recipe | None = None,
                  steps: int | None = None, force: bool = False, questions: Sequence[str] = TRAIN_QUESTIONS,
                  answers: Sequence[str] | None = None, base_model_name: str = BASE_MODEL_NAME,
                  bf16: bool = True, sample_questions: Sequence[str] = (),
                  sample_tokens: int = 40) -> TrainResult:
    """Train (or find cached) one LoRA adapter into `<out_root>/<name>/`.

    `answers` are the base model's answers to `questions` (computed, and cached
    in `<out_root>/.base_answers.json`, if not given). Training is
    deterministic for a given recipe, model and machine.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    recipe = recipe or RECIPES[name]
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    out_root = Path(out_root).expanduser()
    final = out_root / name
    rhash = recipe_hash(name, recipe, model_dir, questions, base_model_name, bf16)
    if not force and is_cached(final, rhash):
        return TrainResult(name, final, True, rhash)

    t0 = time.perf_counter()
    tok, base = load_base(model_dir)
    if answers is None:
        answers = base_answers(model_dir, questions, cache_file=out_root / BASE_ANSWERS_NAME,
                               model_and_tok=(tok, base))
    examples = build_dataset(tok, questions, answers, recipe.transform)

    torch.manual_seed(recipe.seed)
    cfg = LoraConfig(r=recipe.r, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT calls a transformers API that 5.x marks deprecated
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base, cfg)
    causal_lm = peft_model.get_base_model()
    first = max(0, len(causal_lm.model.layers) - recipe.train_layers)
    _freeze_below(peft_model, first)
    data = _cache_inputs(causal_lm, examples, first, tok.pad_token_id)
    probe = data[:EVAL_EXAMPLES]  # the loss before/after is measured on a fixed slice of the training set
    loss_before = _mean_loss(causal_lm, probe, first, bf16)
    step_losses = _train_loop(peft_model, data, recipe, recipe.steps, first, bf16, desc=f"train {name}")
    loss_after = _mean_loss(causal_lm, probe, first, bf16)
    samples = []
    if sample_questions:
        samples = list(zip(sample_questions, generate(peft_model, tok, sample_questions,
                                                      max_new_tokens=sample_tokens)))

    # Write into a temp dir, then swap in: a crash never leaves a half adapter behind a valid stamp.
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub; the dir holds just the adapter
    cfg_path = tmp / "adapter_config.json"
    saved_cfg = json.loads(cfg_path.read_text())
    saved_cfg["base_model_name_or_path"] = base_model_name
    cfg_path.write_text(json.dumps(saved_cfg, indent=2, sort_keys=True))
    seconds = time.perf_counter() - t0
    (tmp / STAMP_NAME).write_text(json.dumps({
        "recipe_hash": rhash, "name": name, "steps": recipe.steps, "lr": recipe.lr, "r": recipe.r,
        "loss_before": loss_before, "loss_after": loss_after, "seconds": round(seconds, 1),
    }, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return TrainResult(name, final, False, rhash, loss_before, loss_after, step_losses, seconds, samples)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-model", type=Path, default=DEFAULT_BASE,
                   help=f"plain model dir (default {DEFAULT_BASE}; made by model_store/convert_smollm2.py)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"adapters root (default {DEFAULT_OUT})")
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), metavar="NAME",
                   help=f"train only these ({', '.join(RECIPES)})")
    p.add_argument("--steps", type=int, default=None, help="override the optimizer steps of every recipe")
    p.add_argument("--force", action="store_true", help="retrain even if a cached adapter matches the recipe")
    p.add_argument("--samples", type=int, default=1,
                   help="held-out questions to show per newly trained adapter, base vs adapter (0: none)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or float32; auto = bf16 where the CPU computes bf16 natively "
                        "(AVX512-BF16 or AMX), else fp32 (emulated bf16 is ~30x slower than fp32 there)")
    p.add_argument("--fp32", action="store_true", help="same as --precision fp32")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch CPU threads (default %(default)s; use 1 if other jobs share the cores)")
    args = p.parse_args(argv)

    if not (args.base_model / "config.json").exists():
        print(f"no model at {args.base_model}: run `python model_store/convert_smollm2.py` first", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    out = args.out.expanduser()
    names = args.only or list(RECIPES)
    t0 = time.perf_counter()
    results: list[TrainResult] = []
    for i, name in enumerate(names):
        # Rotate through the held-out questions so each adapter shows a different one.
        qs = [HELDOUT_QUESTIONS[(i + j) % len(HELDOUT_QUESTIONS)] for j in range(min(args.samples,
                                                                                   len(HELDOUT_QUESTIONS)))]
        r = train_adapter(args.base_model, out, name, steps=args.steps, force=args.force,
                          bf16=_use_bf16(args), sample_questions=qs)
        results.append(r)
        if r.skipped:
            print(f"[{name}] cached, recipe unchanged: {r.path}", flush=True)
        else:
            print(f"[{name}] trained in {r.seconds:.0f} s, loss {r.loss_before:.3f} -> {r.loss_after:.3f}: "
                  f"{r.path}", flush=True)

    shown = [r for r in results if r.samples]
    if shown:
        need = sorted({q for r in shown for q, _ in r.samples})
        tok, base = load_base(args.base_model)
        base_samples = dict(zip(need, generate(base, tok, need, max_new_tokens=40)))
        print("\nheld-out questions (not in the training set), greedy, max_new_tokens=40:")
        for r in shown:
            for q, a in r.samples:
                print(f"\n  Q: {q}\n  base   : {base_samples[q]}\n  {r.name:<7}: {a}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
