"""Which PEFT LoRA adapters loraplex accepts and what their weights mean: one set of rules that
onboarding (`tenant_registry.validate`) and the engines' loader (`handler.engine.multilora.adapter_file`)
both call, so they accept and refuse exactly the same adapters with the same message.

Accepted (the engines apply them as PEFT does; tests/test_adapter_format.py compares logits):
  `peft_type: LORA`, `r`, `lora_alpha`, `use_rslora` (scale alpha/sqrt(r) instead of alpha/r),
  `rank_pattern` / `alpha_pattern` (per-module r / alpha; a key matches a module path by PEFT's
  `get_pattern_key` rule, `(.*\\.)?(key)$`, first key in file order wins), `target_modules` as a
  list of names (exact path or dotted suffix) or one regex string (full match), `exclude_modules`,
  `layers_to_transform` / `layers_pattern`, options that only matter for training (dropout,
  `init_lora_weights` True/False/"gaussian"/"eva"/"orthogonal", `inference_mode`, ...).
Refused: another `peft_type`, DoRA, `bias` other than "none", every other LoRA variant or option
  that changes the forward pass (`lora_bias`, `fan_in_fan_out`, `modules_to_save`,
  `trainable_token_indices`, `target_parameters`, `layer_replication`, aLoRA, Arrow, QALoRA,
  VeLoRA, MonteCLoRA, ...), any option not known here whose value is set, `init_lora_weights`
  that derive the adapter from a modified base (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA, MiCA: such
  an adapter is only right on the base model its init rewrote, and PEFT would rewrite the shared
  base at load), ranks above `max_rank`, non-float tensors, tensors other than
  `base_model.model.<module>.lora_{A,B}.weight`, modules that are not linear layers of the base
  model or not among the targets the engine wraps, shapes that disagree with the base layer.

Errors: every refusal is an `AdapterRefused` with a stable `code`, the `file` it concerns and a
`reason`; each side re-raises it as its own error type (`unsupported` picks the engine's
`UnsupportedAdapter` over `AdapterFormatError`). Pure functions; safe from any thread.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .files import CONFIG_FILE, WEIGHTS_FILE, AdapterBytes
from .header import HeaderError, SafetensorsHeader, parse_header

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_PREFIX = "base_model.model."

# Codes of a well-formed adapter using something loraplex does not implement (vs a malformed one).
UNSUPPORTED_CODES = frozenset({"not_lora", "dora", "bias", "unsupported_option", "target_not_allowed",
                               "unknown_module", "rank_too_large", "bad_dtype"})


class AdapterRefused(ValueError):
    """An adapter breaks one of the rules above. str() is "<file>: <reason>"."""

    def __init__(self, reason: str, *, code: str, file: str | None) -> None:
        super().__init__(f"{file}: {reason}" if file else reason)
        self.reason = reason
        self.code = code
        self.file = file

    @property
    def unsupported(self) -> bool:
        return self.code in UNSUPPORTED_CODES


def shorten(value: object, limit: int = 40) -> str:
    """repr() of untrusted input, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------- the config
# Options whose set value changes the forward pass: refused with a message of their own.
_REFUSED_OPTIONS = {
    "lora_bias": "a bias on lora_B (lora_bias) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "mica": "MiCA (mica) is not supported",
}
# Options that do not change what a saved adapter computes at inference (or are read below).
_KNOWN_OPTIONS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
    "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config",
    "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying",
})
_INITS_OK = (True, False, "gaussian", "eva", "orthogonal")


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of `adapter_config.json` that decide what the weights mean; `raw` is the whole
    JSON object (for PEFT's own `LoraConfig`)."""

    raw: Mapping[str, Any]
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str          # names (exact path or dotted suffix) or one regex
    exclude_modules: tuple[str, ...] | str | None
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...]
    base_model_name_or_path: str | None

    def targets(self, module: str) -> bool:
        """Whether PEFT would put this adapter on `module` (peft.tuners.tuners_utils.check_target_module_exists)."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, module):
                    return False
            elif module in ex or any(module.endswith("." + e) for e in ex):
                return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            return True
        if not any(module.endswith("." + t) for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            m = None
            for p in self.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                if m is not None:
                    break
        return m is not None and int(m.group("idx")) in self.layers_to_transform

    def rank_of(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_of(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_of(self, module: str) -> float:
        r, alpha = self.rank_of(module), self.alpha_of(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    # peft.utils.other.get_pattern_key: a key matches a dotted suffix of the module path (regex allowed).
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v > 0


MAX_PATTERN_CHARS = 256


def _regex(v: object) -> bool:
    """A regular expression from a tenant's config that is safe to run: it compiles, is short, and
    has no repetition inside a repetition (`(a+)+`, `(.*)*`: exponential backtracking on a module
    path would hang the validator and the worker; PEFT would run it too)."""
    if not isinstance(v, str) or not v or len(v) > MAX_PATTERN_CHARS:
        return False
    try:
        re.compile(v)
        tree = _sre_parse(v)
    except (re.error, RecursionError, OverflowError):
        return False
    return not _nested_repeat(tree, False)


def _sre_parse(v: str):
    import re._parser as sre_parse  # the stdlib's own pattern parser (what re.compile runs)

    return sre_parse.parse(v)


def _nested_repeat(items, inside: bool) -> bool:
    import re._constants as c

    for op, arg in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = arg
            repeats = hi is c.MAXREPEAT or hi > 1
            if repeats and inside:
                return True
            if _nested_repeat(sub, inside or repeats):
                return True
        elif op is c.SUBPATTERN:
            if _nested_repeat(arg[-1], inside):
                return True
        elif op is c.BRANCH:
            if any(_nested_repeat(b, inside) for b in arg[1]):
                return True
        elif op in (c.ASSERT, c.ASSERT_NOT):
            if _nested_repeat(arg[1], inside):
                return True
    return False


def parse_config(raw: bytes | Mapping[str, Any]) -> AdapterConfig:
    """Check `adapter_config.json` (its bytes, or the parsed object) against the rules. Raises AdapterRefused."""
    def bad(reason: str, code: str = "bad_config") -> AdapterRefused:
        return AdapterRefused(reason, code=code, file=CONFIG_FILE)

    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            cfg = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad(f"not valid JSON ({str(e)[:120]})") from None
    else:
        cfg = raw
    if not isinstance(cfg, Mapping):
        raise bad("must be a JSON object")
    cfg = dict(cfg)
    if cfg.get("peft_type") != "LORA":
        raise bad(f"peft_type must be \"LORA\", got {shorten(cfg.get('peft_type'))}", "not_lora")
    if cfg.get("use_dora"):
        raise bad("DoRA adapters (use_dora: true) are not supported", "dora")
    if cfg.get("bias", "none") != "none":
        raise bad(f"bias must be \"none\", got {shorten(cfg.get('bias'))}", "bias")
    for opt, why in _REFUSED_OPTIONS.items():
        if cfg.get(opt):
            raise bad(f"option {opt!r} is set ({shorten(cfg.get(opt))}): {why}", "unsupported_option")
    for opt in sorted(cfg):
        if opt not in _KNOWN_OPTIONS and opt not in _REFUSED_OPTIONS and cfg[opt] not in (None, False, [], {}, ""):
            raise bad(f"option {shorten(opt, 60)} is set ({shorten(cfg[opt])}) and is not supported "
                      "(unknown to loraplex, so it could change what the weights mean)", "unsupported_option")
    init = cfg.get("init_lora_weights", True)
    if init not in _INITS_OK or type(init) not in (bool, str):
        raise bad(f"init_lora_weights {shorten(init)} is not supported: that init derives the adapter from a "
                  "modified base model (convert it to a plain LoRA with PEFT's save_pretrained("
                  "path_initial_model_for_weight_conversion=...))", "unsupported_option")
    r = cfg.get("r")
    if type(r) is not int or r < 1:
        raise bad(f"r must be a positive integer, got {shorten(r)}", "bad_rank")
    alpha = cfg.get("lora_alpha", 8)
    if not _number(alpha):
        raise bad(f"lora_alpha must be a positive number, got {shorten(alpha)}")
    if type(cfg.get("use_rslora", False)) is not bool:
        raise bad("use_rslora must be true or false")
    tm = cfg.get("target_modules")
    if isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm):
        targets: tuple[str, ...] | str = tuple(tm)
    elif _regex(tm):
        targets = tm
    else:
        raise bad("target_modules must be a non-empty list of module names or one regular expression "
                  f"(at most {MAX_PATTERN_CHARS} characters, no nested repetition), got {shorten(tm)}",
                  "bad_target_modules")
    ex = cfg.get("exclude_modules")
    if ex is not None and not (_regex(ex) or (isinstance(ex, list) and all(isinstance(e, str) and e for e in ex))):
        raise bad(f"exclude_modules must be a list of module names or one regular expression, got {shorten(ex)}")
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_regex(k) and type(v) is int and v >= 1
                                                     for k, v in rank_pattern.items()):
        raise bad(f"rank_pattern must map module patterns to positive integers, got {shorten(rank_pattern)}")
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict) or not all(_regex(k) and _number(v) for k, v in alpha_pattern.items()):
        raise bad(f"alpha_pattern must map module patterns to positive numbers, got {shorten(alpha_pattern)}")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(type(i) is int and i >= 0 for i in layers)):
        raise bad(f"layers_to_transform must be a layer index or a list of them, got {shorten(layers)}")
    lp = cfg.get("layers_pattern") or ()
    lp = (lp,) if isinstance(lp, str) else lp
    if not (isinstance(lp, (list, tuple)) and all(_regex(p) for p in lp)):
        raise bad(f"layers_pattern must be a name or a list of names, got {shorten(cfg.get('layers_pattern'))}")
    declared = cfg.get("base_model_name_or_path")
    if declared is not None and not isinstance(declared, str):
        raise bad("base_model_name_or_path must be a string")
    return AdapterConfig(
        raw=cfg, r=r, lora_alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=targets, exclude_modules=tuple(ex) if isinstance(ex, list) else ex,
        rank_pattern=dict(rank_pattern), alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        layers_to_transform=tuple(layers) if layers else None, layers_pattern=tuple(lp),
        base_model_name_or_path=declared)


# ---------------------------------------------------------------------------------- the base model's name
def same_base_model(declared: str, expected: str) -> bool:
    """How an adapter's declared base (`base_model_name_or_path`) is matched against the configured
    `base_model_name`: equal strings, or equal last path components, case-insensitively
    ("/models/SmolLM2-135M-Instruct/" and "HuggingFaceTB/SmolLM2-135M-Instruct" both match
    "smollm2-135m-instruct")."""
    if declared == expected:
        return True
    return bool(_last(declared)) and _last(declared) == _last(expected)


def _last(s: str) -> str:
    return re.split(r"[/\\]", s.rstrip("/\\"))[-1].lower()


def check_base_model(config: AdapterConfig, base_model_name: str) -> None:
    """Refuse an adapter that does not name the configured base model ("" accepts any). Onboarding's rule:
    the engine only sees shapes, which are always checked."""
    if not base_model_name:
        return
    declared = config.base_model_name_or_path
    if isinstance(declared, str) and same_base_model(declared, base_model_name):
        return
    suggest = _last(declared) if isinstance(declared, str) else ""
    accept = (f"set base_model_name: {suggest!r}, or \"\" to accept any name" if suggest else
              "set base_model_name: \"\" to accept any name")
    raise AdapterRefused(
        f"base_model_name_or_path {shorten(declared, 200)} does not name the base model {base_model_name!r} "
        f"(config key base_model_name). A declared base matches when it equals base_model_name or has the same "
        f"last path component, case-insensitively; to accept this adapter {accept} (shapes are always checked)",
        code="base_model_mismatch", file=CONFIG_FILE)


# ---------------------------------------------------------------------------------- the weights
@dataclass(frozen=True)
class LinearLayers:
    """The base model's linear layers as an adapter sees them: `adaptable` (module path ->
    (in_features, out_features)) are the ones it may modify (the engine wraps them), `other` the
    rest of the base model's linear layers."""

    adaptable: Mapping[str, tuple[int, int]]
    other: frozenset[str]

    @classmethod
    def of(cls, linears: Mapping[str, tuple[int, int]], targets: Sequence[str] | None) -> "LinearLayers":
        """Split all linears (path -> (in, out)) by leaf name in `targets` (None: all adaptable)."""
        ok = {m: s for m, s in linears.items() if targets is None or m.rsplit(".", 1)[-1] in targets}
        return cls(ok, frozenset(set(linears) - set(ok)))

    def all(self) -> Iterable[str]:
        return [*self.adaptable, *sorted(self.other)]


@dataclass(frozen=True)
class ModuleWeights:
    """One modified module: its tensors' keys, its rank and its scale (alpha/r or alpha/sqrt(r))."""

    module: str
    key_a: str
    key_b: str
    rank: int
    scale: float


@dataclass(frozen=True)
class ParsedAdapter:
    """An adapter that passed every rule: its bytes, config, header and modules (sorted by path)."""

    source: AdapterBytes
    config: AdapterConfig
    header: SafetensorsHeader
    modules: tuple[ModuleWeights, ...]

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)


def _classify_key(key: str) -> tuple[str, str]:
    def bad(reason: str, code: str = "unexpected_tensor") -> AdapterRefused:
        return AdapterRefused(reason, code=code, file=WEIGHTS_FILE)

    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
    if name is not None:
        for suffix, ab in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if name.endswith(suffix) and re.fullmatch(r"[A-Za-z0-9_.]+", name[: -len(suffix)]):
                return name[: -len(suffix)], ab
    if "lora_magnitude_vector" in key:
        raise bad(f"tensor {shorten(key, 120)}: DoRA magnitude vectors are not supported", "dora")
    if "lora_embedding" in key:
        raise bad(f"tensor {shorten(key, 120)}: LoRA on an embedding layer is not supported", "unsupported_option")
    if key.endswith(".lora_B.bias"):
        raise bad(f"tensor {shorten(key, 120)}: a bias on lora_B is not supported", "unsupported_option")
    raise bad(f"unexpected tensor {shorten(key, 120)}: only "
              "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight' are accepted")


def check_weights(config: AdapterConfig, header: SafetensorsHeader, layers: LinearLayers,
                  max_rank: int) -> tuple[ModuleWeights, ...]:
    """Every tensor is a LoRA A/B of an adaptable module the config targets, in a float dtype, with
    the shapes its rank and the base layer imply; every module the config targets has both. Raises
    AdapterRefused."""
    def bad(reason: str, code: str, file: str = WEIGHTS_FILE) -> AdapterRefused:
        return AdapterRefused(reason, code=code, file=file)

    found: dict[str, dict[str, str]] = {}
    # LoRA tensors first, so the most specific complaint (e.g. an embedding's LoRA) wins.
    for key in sorted(header.tensors, key=lambda k: ("lora_" not in k, k)):
        module, ab = _classify_key(key)
        info = header.tensors[key]
        if module not in layers.adaptable:
            if module in layers.other:
                allowed = sorted({m.rsplit(".", 1)[-1] for m in layers.adaptable})
                raise bad(f"module {module!r} is not an allowed target (allowed: {', '.join(allowed)})",
                          "target_not_allowed")
            raise bad(f"tensor {shorten(key, 120)} is for module {module!r}, which does not exist in the base "
                      "model as a linear layer", "unknown_module")
        if not config.targets(module):
            raise bad(f"tensor for module {module!r}, which the config's target_modules does not target",
                      "config_mismatch")
        if info.dtype not in FLOAT_DTYPES:
            raise bad(f"tensor {shorten(key, 120)} has dtype {info.dtype}; expected one of {', '.join(FLOAT_DTYPES)}",
                      "bad_dtype")
        found.setdefault(module, {})[ab] = key
    if not found:
        raise bad("holds no LoRA tensors", "no_tensors")
    modules = []
    for module in sorted(found):
        pair = found[module]
        for ab in "AB":
            if ab not in pair:
                raise bad(f"module {module!r} has no lora_{ab}.weight", "missing_tensor")
        r = config.rank_of(module)
        if r > max_rank:
            raise bad(f"rank {r} of {module!r} exceeds the maximum rank {max_rank}", "rank_too_large",
                      CONFIG_FILE)
        in_f, out_f = layers.adaptable[module]
        sa, sb = header.tensors[pair["A"]].shape, header.tensors[pair["B"]].shape
        if sa != (r, in_f) or sb != (out_f, r):
            raise bad(f"shape mismatch for {module!r}: lora_A {list(sa)}, lora_B {list(sb)}, expected "
                      f"[{r}, {in_f}] and [{out_f}, {r}] (rank {r}; base layer in={in_f}, out={out_f})",
                      "shape_mismatch")
        modules.append(ModuleWeights(module, pair["A"], pair["B"], r, config.scale_of(module)))
    every = list(layers.all())
    names = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    for t in names:
        hit = (lambda m: re.fullmatch(t, m) is not None) if isinstance(config.target_modules, str) else \
            (lambda m: m == t or m.endswith("." + t))
        if not any(hit(m) for m in every):
            raise bad(f"target module {t!r} does not exist in the base model as a linear layer", "unknown_module",
                      CONFIG_FILE)
    missing = sorted(m for m in every if config.targets(m) and m not in found)
    if missing:
        raise bad(f"missing tensors for {len(missing)} targeted module(s), e.g. {missing[0]!r}", "missing_tensor")
    return tuple(modules)


def check_adapter(adapter: AdapterBytes, layers: LinearLayers, max_rank: int) -> ParsedAdapter:
    """All the rules, on an adapter held in memory: the config, the safetensors header, the weights.
    Raises AdapterRefused."""
    config = parse_config(adapter.config)
    try:
        header = parse_header(adapter.weights)
    except HeaderError as e:
        raise AdapterRefused(f"not a valid safetensors file: {e}", code="corrupt_safetensors",
                             file=WEIGHTS_FILE) from None
    return ParsedAdapter(adapter, config, header, check_weights(config, header, layers, max_rank))
