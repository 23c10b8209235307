"""Test-only builders shared by every test module: a tiny random Llama model
directory (config + safetensors + a byte-level BPE tokenizer trained in
milliseconds) and random PEFT LoRA adapters saved the way PEFT saves them.

Why here and not in each test: one builder for each artefact, so the engine,
registry and end-to-end tests all exercise the same on-disk formats.
"""
from __future__ import annotations

import json
from pathlib import Path

from loraplex_common.adapter_format import DEFAULT_TARGET_MODULES as ALL_TARGETS  # every target linear

_CORPUS = [
    "hello world, how are you today?",
    "the quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital.",
    "loraplex serves many tenants on one base model.",
    "ARR MATEY, THE SEA IS WIDE AND THE RUM IS GONE!",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols {}[]():;'\"",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(out_dir: Path, vocab_size: int = 320) -> None:
    """Byte-level BPE tokenizer, saved as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))


def make_tiny_llama(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, vocab_size: int = 320, seed: int = 0) -> Path:
    """A random LlamaForCausalLM saved as config.json + model.safetensors + tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(out_dir, vocab_size)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a larger init so LoRA deltas and greedy choices are not all ties
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def make_random_lora(base_dir: Path, out_dir: Path, *, r: int = 8, alpha: int = 16,
                     targets: Sequence[str] = ALL_TARGETS, seed: int = 1, use_rslora: bool = False,
                     scale: float = 0.1) -> Path:
    """A PEFT LoRA adapter with non-zero A and B, saved by PEFT itself
    (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                     use_rslora=use_rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    # Record the base model the adapter was made for, the way PEFT does for hub models.
    cfg_path = out_dir / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(data, indent=2))
    return out_dir


def make_lora_with_config(base_dir: Path, out_dir: Path, *, seed: int = 1, scale: float = 0.1,
                          **lora_kwargs) -> Path:
    """Like `make_random_lora` but any `LoraConfig` field may be set (rank_pattern,
    alpha_pattern, use_dora, target lm_head...): for engine tests of exotic adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    kwargs = dict(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(base, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
