"""1,000 random load/evict/reload cycles: outputs still match PEFT, memory
returns to its starting value (once the gather workspace, which mixed batches
keep between calls, is released), and a reused slot never leaks old values."""
from __future__ import annotations

import gc
import random

import torch

from conftest import load_base, peft_row_logits, rel_err
from handler.engine.multilora import MultiLoraModel
from handler.engine.settings import EngineSettings

POOL_NAMES = ["r4", "r8qv", "r16rs", "r64", "r16mlp", "r8rs", "patterned"]


def _engine_tensors(ml: MultiLoraModel) -> tuple[int, int]:
    """(count, bytes) of distinct storages the engine references: parameters,
    buffers, tensor attributes of every module, the per-batch context."""
    storages = {}
    for mod in ml.modules():
        for v in list(mod.__dict__.values()) + list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if isinstance(v, torch.Tensor):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    for v in ml._ctx.held_tensors():
        storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return len(storages), sum(storages.values())


def _live_cpu_tensor_bytes() -> int:
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
            except RuntimeError:  # fake/functional tensors left by torch.compile in other tests have no storage
                continue
    return sum(seen.values())


def test_thousand_random_load_evict_cycles(tiny_model_dir, engine_adapters, peft_oracle):
    torch.manual_seed(5)
    ids = torch.randint(3, 300, (len(POOL_NAMES), 8))
    refs = {n: peft_row_logits(peft_oracle, n, ids[i]) for i, n in enumerate(POOL_NAMES)}
    ml = MultiLoraModel(load_base(tiny_model_dir), settings=EngineSettings(num_slots=4, max_rank=64))

    def check(loaded):
        names = [n if n in loaded else None for n in POOL_NAMES]
        with torch.no_grad():
            out = ml(ids, adapter_names=names).logits
        for i, n in enumerate(names):
            if n is not None:
                assert rel_err(out[i], refs[n]) <= 1e-5, n

    pool, pool_ptr, pool_shape = ml.pool, ml.pool.data_ptr(), ml.pool.shape
    check(set())
    gc.collect()
    held0, live0 = _engine_tensors(ml), _live_cpu_tensor_bytes()
    rng = random.Random(0)
    loaded: set[str] = set()
    for cycle in range(1000):
        if loaded and (len(loaded) == 3 or rng.random() < 0.5):
            victim = rng.choice(sorted(loaded))
            ml.delete_adapter(victim)
            loaded.discard(victim)
        else:
            name = rng.choice([n for n in POOL_NAMES if n not in loaded])
            ml.load_adapter(engine_adapters[name], name)
            loaded.add(name)
        if cycle % 100 == 99:
            check(loaded)
            free = [s for s in range(1, ml.num_slots) if s not in {ml.slot_of(n) for n in loaded}]
            assert all(not ml.pool[s].any() for s in free)  # freed slots are zero, whole extent
    check(loaded)
    for n in sorted(loaded):
        ml.delete_adapter(n)
    check(set())
    assert ml.pool is pool and ml.pool.data_ptr() == pool_ptr and ml.pool.shape == pool_shape
    assert not ml.pool.any()
    # mixed batches gathered into the workspace kept between calls: bounded, reported, and
    # the only memory left once the adapters are gone
    kept = ml.get_model_status()["gather_workspace_bytes"]
    assert 0 < kept <= 512 << 20
    assert ml.release_gather_workspace() == kept
    gc.collect()
    assert _engine_tensors(ml) == held0
    assert _live_cpu_tensor_bytes() <= live0


def test_reused_slot_never_exposes_old_values(tiny_model_dir, engine_adapters, peft_oracle):
    ml = MultiLoraModel(load_base(tiny_model_dir), settings=EngineSettings(num_slots=3, max_rank=64))
    ml.load_adapter(engine_adapters["r64"], "big")  # rank 64 in every target
    slot = ml.slot_of("big")
    assert ml.pool[slot].any()
    ml.delete_adapter("big")
    assert not ml.pool[slot].any()
    ml.load_adapter(engine_adapters["r8qv"], "small")  # rank 8, q/v only, same slot
    assert ml.slot_of("small") == slot
    for name, layer in ml.lora_layers.items():
        assert not layer.lora_A[slot, 8:].any() and not layer.lora_Bt[slot, 8:].any()
        if not name.endswith(("q_proj", "v_proj")):
            assert not layer.lora_A[slot].any() and not layer.lora_Bt[slot].any() and layer.scaling[slot] == 0
    torch.manual_seed(6)
    ids = torch.randint(3, 300, (1, 10))
    with torch.no_grad():
        out = ml(ids, adapter_names=["small"]).logits[0]
    assert rel_err(out, peft_row_logits(peft_oracle, "r8qv", ids[0])) <= 1e-5


def test_failed_load_releases_its_slot(tiny_model_dir, engine_adapters, tmp_path):
    import shutil

    ml = MultiLoraModel(load_base(tiny_model_dir), settings=EngineSettings(num_slots=2, max_rank=64))
    broken = tmp_path / "broken"
    shutil.copytree(engine_adapters["r4"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    try:
        ml.load_adapter(broken, "broken")
    except ValueError as exc:
        assert "safetensors file" in str(exc)  # the reader says what is wrong with it
    else:
        raise AssertionError("a corrupt file was accepted")
    ml.load_adapter(engine_adapters["r4"], "ok")  # the only slot is still free
    assert ml.get_model_status()["free_slots"] == 0
