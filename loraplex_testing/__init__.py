"""Development and test support shared by `tests/`, `bench/`, `demo/` and `scripts/`.

Not part of the worker: nothing in `handler/` or `tenant_registry/` imports it.
Installed with the project (editable), so tests and benchmarks import it
without editing `sys.path`.

- `models`: tiny random models, tokenizers and PEFT LoRA adapters on disk.
- `oracle`: plain transformers/PEFT references a result is judged against.
- `services`: private `redis-server` and `torchserve` instances on 127.0.0.1.
"""
