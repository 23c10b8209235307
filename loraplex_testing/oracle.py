"""The oracle every engine result is judged against: plain transformers (+ PEFT), one
prompt alone."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


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
