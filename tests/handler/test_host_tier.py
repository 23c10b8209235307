"""The host-memory tier beneath the device slots, pinning and prefetch at worker start, through the
worker's request path (LoraplexService over the tiny Llama, a real redis-server, the real store).
PEFT is the oracle for every text; store reads are counted through a wrapper of the residency's read.
The multilora engine's slot images (what the tier holds for it): a reload from one gives the logits
a load from the store gives, bit for bit, and PEFT's."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from handler.engine import EngineSettings, make_engine
from handler.engine.errors import EngineError
from handler.engine.multilora.slot_loader import SlotImage
from handler.host_tier import HostTier
from handler.service import LoraplexService
from loraplex_common.adapter_format import WEIGHTS_FILE, AdapterBytes, parse_header
from loraplex_testing.oracle import PeftOracle, rel_err
from loraplex_common.config import LoraplexConfig
from tenant_registry.registry import PinLimitReached


def _count_reads(svc: LoraplexService) -> list[str]:
    """Every store read the residency makes from now on, by adapter id."""
    reads: list[str] = []
    inner = svc.residency._read

    def read(record):
        reads.append(record.adapter_id)
        return inner(record)

    svc.residency._read = read
    return reads


def _wait_for(predicate, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _seen(svc: LoraplexService, action):
    """Run a registry change and wait until the worker's subscriber has handed its event on."""
    n = svc.resolver.events_seen
    out = action()
    _wait_for(lambda: svc.resolver.events_seen > n, "the registry event")
    return out


def _weights(adapter_dir) -> bytes:
    return (adapter_dir / WEIGHTS_FILE).read_bytes()


def _tensor_bytes(adapter_dir) -> int:
    """The adapter's weights without the file's header: what its fp32 slot image holds in an fp32 pool."""
    return parse_header(_weights(adapter_dir)).data_len


def _image(nbytes: int) -> SlotImage:
    return SlotImage(torch.zeros(nbytes, dtype=torch.uint8), ((0, nbytes),), ranks=(1,), scales=(1.0,), config=None,
                     layout=(nbytes, torch.uint8, 1))


# -- the tier alone ------------------------------------------------------------------

def test_tier_is_an_lru_by_bytes_that_copies_and_protects():
    tier = HostTier(250, pin=False)
    buf = bytearray(b"x" * 100)
    assert tier.put("a", "a@v1", AdapterBytes.of(b"{}", memoryview(buf), "a@v1"))
    buf[:] = b"y" * 100  # the store's buffer is reused by its next read: the tier must hold a copy
    assert bytes(tier.get("a@v1").weights) == b"x" * 100
    assert tier.put("b", "b@v1", AdapterBytes.of(b"{}", b"b" * 100))
    tier.get("a@v1")  # a is now the most recently used
    assert tier.put("c", "c@v1", AdapterBytes.of(b"{}", b"c" * 100))  # 300 > 250: the LRU (b) goes
    assert "b@v1" not in tier and "a@v1" in tier and "c@v1" in tier
    assert tier.counters.host_evictions == 1 and tier.counters.host_bytes == 200
    tier.protect({"a@v1", "c@v1"})
    assert not tier.put("d", "d@v1", AdapterBytes.of(b"{}", b"d" * 100))  # only protected ones could go
    assert "a@v1" in tier and "c@v1" in tier and "d@v1" not in tier
    assert not tier.put("e", "e@v1", AdapterBytes.of(b"{}", b"e" * 251))  # bigger than the budget
    assert tier.get("d@v1") is None and tier.counters.host_misses == 1 and tier.counters.host_hits == 2
    assert tier.drop_tenant("a") == ["a@v1"] and tier.counters.host_bytes == 100
    off = HostTier(0, pin=False)
    assert not off.put("a", "a@v1", AdapterBytes.of(b"{}", b"x")) and off.get("a@v1") is None
    assert off.counters.host_misses == 0
    assert not off.put_image("a", "a@v1", _image(1)) and len(off) == 0


def test_a_slot_image_replaces_the_held_bytes_and_counts_its_own():
    tier = HostTier(250, pin=False)
    assert tier.put("a", "a@v1", AdapterBytes.of(b"{}", b"a" * 100))
    assert tier.put("b", "b@v1", AdapterBytes.of(b"{}", b"b" * 100))
    image = _image(80)
    assert tier.put_image("a", "a@v1", image)  # in place of a's bytes: 80 + 100 held
    assert tier.get("a@v1") is image and tier.counters.host_bytes == 180 and len(tier) == 2
    assert [(e["adapter"], e["form"]) for e in tier.snapshot()["adapters"]] == [("a@v1", "image"), ("b@v1", "bytes")]
    assert tier.put_image("a", "a@v1", _image(10)) and tier.get("a@v1") is image  # an image is kept as it is
    tier.protect({"a@v1"})
    assert not tier.put_image("b", "b@v1", _image(200))  # 80 protected + 200 > 250: b's bytes stay
    assert bytes(tier.get("b@v1").weights) == b"b" * 100 and tier.counters.host_bytes == 180
    assert tier.put_image("c", "c@v1", _image(170))  # b (the LRU unprotected) goes to make room
    assert "b@v1" not in tier and tier.counters.host_bytes == 250 and tier.counters.host_evictions == 1
    assert tier.drop_tenant("a") == ["a@v1"] and tier.counters.host_bytes == 170


# -- slot images in the engine -------------------------------------------------------

def _engine(model_dir, *, rank: int = 16, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    return make_engine("multilora", model, EngineSettings(num_slots=4, max_rank=rank), eos_token_ids=[0],
                       pad_token_id=0)


def test_a_reload_from_a_slot_image_gives_the_store_loads_logits_exactly_and_peft_s(tiny_model_dir, tiny_adapters):
    """Every tiny adapter (ranks 4/8/16, all or some targets, rsLoRA): loaded from its bytes, its
    slot image taken, evicted, another adapter loaded so the image lands in another slot; the
    reloaded adapter's fp32 logits equal the store load's bit for bit and PEFT's within 1e-5."""
    engine = _engine(tiny_model_dir)
    oracle = PeftOracle(tiny_model_dir, tiny_adapters)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2]])
    for name, adapter_dir in tiny_adapters.items():
        engine.load_adapter(AdapterBytes.read_dir(adapter_dir), name)
        with torch.inference_mode():
            from_store = engine.model(input_ids=ids, adapter_names=[name]).logits[0]
        slot, config, nbytes = engine.model.slot_of(name), engine.peft_config[name], engine.model.adapter_nbytes(name)
        image = engine.slot_image(name)
        assert image.nbytes == nbytes == _tensor_bytes(adapter_dir)  # true rank, fp32: the file's tensors
        engine.delete_adapter(name)
        engine.load_adapter(tiny_adapters["b"], "other")  # takes the freed slot: the image goes elsewhere
        loaded = engine.load_image(image, name)
        assert engine.model.slot_of(name) != slot and loaded.nbytes == nbytes and engine.peft_config[name] is config
        with torch.inference_mode():
            reloaded = engine.model(input_ids=ids, adapter_names=[name]).logits[0]
        assert torch.equal(reloaded, from_store), name
        assert rel_err(reloaded, oracle.logits(name, ids[0].tolist())) <= 1e-5, name
        engine.delete_adapter(name)
        engine.delete_adapter("other")


def _bf16_copy(adapter_dir, out):
    """The adapter with its tensors stored as bf16 (another file dtype than the pool's)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    (out / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(adapter_dir / WEIGHTS_FILE)).items()},
              str(out / WEIGHTS_FILE))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_image_made_from_the_bytes_on_another_thread_is_what_a_load_leaves_bit_for_bit(tiny_model_dir,
                                                                                          tiny_adapters, tmp_path,
                                                                                          dtype):
    """`image_from_bytes` (what the adapter fetch thread prepares a store load with) gives the
    slot image a load from the same bytes leaves, bit for bit (fp32 and bf16 files, fp32 and bf16
    pools, every tiny adapter), and loading it leaves the slot exactly as that load does."""
    import threading

    engine = _engine(tiny_model_dir, dtype=dtype)
    facade = engine.model
    sources = {**tiny_adapters, "c-bf16": _bf16_copy(tiny_adapters["c"], tmp_path / "c-bf16")}
    for name, adapter_dir in sources.items():
        made: list[SlotImage] = []
        worker = threading.Thread(target=lambda: made.append(engine.image_from_bytes(AdapterBytes.read_dir(adapter_dir))))
        worker.start()
        worker.join()
        (image,) = made
        engine.load_adapter(AdapterBytes.read_dir(adapter_dir), name)
        slot = facade.slot_of(name)
        row, scales = facade.pool[slot].clone(), facade._scales[:, slot].clone()
        taken = engine.slot_image(name)
        assert (image.runs, image.ranks, image.scales, image.layout) == (taken.runs, taken.ranks, taken.scales,
                                                                         taken.layout), name
        assert image.data.dtype == taken.data.dtype == dtype and torch.equal(image.data, taken.data), name
        assert image.config == taken.config, name
        engine.delete_adapter(name)
        engine.load_image(image, name)
        slot = facade.slot_of(name)
        assert torch.equal(facade.pool[slot], row) and torch.equal(facade._scales[:, slot], scales), name
        engine.delete_adapter(name)


def test_an_image_from_bytes_refuses_what_a_load_refuses_with_the_same_error(tiny_model_dir, tiny_adapters):
    engine = _engine(tiny_model_dir, rank=8)  # adapter c has rank 16
    with pytest.raises(EngineError) as from_load:
        engine.load_adapter(AdapterBytes.read_dir(tiny_adapters["c"]), "c")
    with pytest.raises(EngineError) as from_image:
        engine.image_from_bytes(AdapterBytes.read_dir(tiny_adapters["c"]))
    assert type(from_image.value) is type(from_load.value) and str(from_image.value) == str(from_load.value)
    assert engine.model.get_model_status()["free_slots"] == 3 and engine.peft_config == {}


def test_a_slot_image_is_the_slot_bit_for_bit_in_a_bf16_pool_and_fits_only_its_own_layout(tiny_model_dir,
                                                                                           tiny_adapters):
    engine = _engine(tiny_model_dir, dtype=torch.bfloat16)
    engine.load_adapter(tiny_adapters["c"], "c")
    facade = engine.model
    slot = facade.slot_of("c")
    row, scales = facade.pool[slot].clone(), facade._scales[:, slot].clone()
    image = engine.slot_image("c")
    assert image.data.dtype == torch.bfloat16 and image.nbytes == _tensor_bytes(tiny_adapters["c"]) // 2
    engine.delete_adapter("c")
    engine.load_image(image, "c")
    slot = facade.slot_of("c")
    assert torch.equal(facade.pool[slot], row) and torch.equal(facade._scales[:, slot], scales)
    assert [l.slot_rank[slot] for l in facade.lora_layers.values()] == list(image.ranks)
    other = _engine(tiny_model_dir, rank=8, dtype=torch.bfloat16)  # another pool layout
    with pytest.raises(EngineError, match="slot image for a pool of layout"):
        other.load_image(image, "c")
    assert other.model.get_model_status()["free_slots"] == 3 and other.peft_config == {}


# -- through the service -----------------------------------------------------------------

def test_evicted_adapter_reloads_from_the_host_tier_without_a_store_read(make_service, tools, tiny_adapters):
    svc = make_service(num_slots=3, device="cpu")  # one resident adapter: every switch evicts; fp32 bytes, plain memory
    for name in ("a", "b"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    expected = {n: tools.expected(svc, tiny_adapters[n]) for n in ("a", "b")}
    reads = _count_reads(svc)
    for name in ("a", "b", "a", "b", "a"):
        reply = tools.ask(svc, f"t-{name}")
        assert reply.status == 200 and reply.body["text"] == expected[name]
    assert reads == ["t-a@v1", "t-b@v1"]  # the three reloads came from the tier
    state = svc.describe()
    c = state["counters"]
    assert c["host_hits"] == 3 and c["host_misses"] == 2 and c["evictions_lru"] == 4 and c["loads"] == 5
    assert state["resident"][0]["adapter"] == "t-a@v1" and state["resident"][0]["source"] == "host"
    assert state["last_acquire"]["adapter"] == "t-a@v1" and state["last_acquire"]["source"] == "host"
    assert {a["adapter"] for a in state["host_tier"]["adapters"]} == {"t-a@v1", "t-b@v1"}
    assert state["host_tier"]["pinned_memory"] is False  # a CPU worker: plain memory
    assert {a["form"] for a in state["host_tier"]["adapters"]} == {"image"}  # the engine's slot images
    assert c["host_bytes"] == sum(_tensor_bytes(tiny_adapters[n]) for n in ("a", "b"))  # fp32, at true rank
    again = tools.ask(svc, "t-a")
    assert svc.describe()["last_acquire"]["source"] == "device" and again.body["text"] == expected["a"]


def test_without_the_tier_every_reload_reads_the_store(make_service, tools, tiny_adapters):
    svc = make_service(num_slots=3, host_tier_mb=0)
    for name in ("a", "b"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    reads = _count_reads(svc)
    for name in ("a", "b", "a"):
        assert tools.ask(svc, f"t-{name}").status == 200
    assert reads == ["t-a@v1", "t-b@v1", "t-a@v1"]
    assert svc.describe()["counters"]["host_hits"] == 0


def test_the_tier_budget_evicts_the_least_recently_used_by_bytes(make_service, tools, tiny_adapters):
    svc = make_service(num_slots=3, device="cpu")  # the budget is set in fp32 images' bytes
    for name in ("a", "b", "c"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    size = {n: len(_weights(tiny_adapters[n])) for n in ("a", "b", "c")}
    svc.residency.host_tier.budget_bytes = size["a"] + size["c"] + 1  # never all three; b (r=8, 2 modules) is smallest
    assert size["b"] < size["a"] < size["c"]
    reads = _count_reads(svc)
    for name in ("a", "b", "c"):  # c evicts a (the LRU) from the tier: a + b + c do not fit
        assert tools.ask(svc, f"t-{name}").status == 200
    held = [a["adapter"] for a in svc.describe()["host_tier"]["adapters"]]
    assert held == ["t-c@v1", "t-b@v1"] and svc.describe()["counters"]["host_evictions"] == 1
    assert tools.ask(svc, "t-a").body["text"] == tools.expected(svc, tiny_adapters["a"])
    assert reads == ["t-a@v1", "t-b@v1", "t-c@v1", "t-a@v1"]  # a came from the store again
    assert svc.describe()["counters"]["host_bytes"] <= svc.residency.host_tier.budget_bytes


def test_pinned_tenant_survives_eviction_pressure_in_both_tiers(make_service, tools, tiny_adapters):
    svc = make_service(num_slots=4, max_pinned_adapters=1)  # two resident adapters
    for name in ("a", "b", "c"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    size = {n: len(_weights(tiny_adapters[n])) for n in ("a", "b", "c")}
    svc.residency.host_tier.budget_bytes = size["a"] + size["c"]  # a beside one other at most
    assert _seen(svc, lambda: svc.registry.pin("t-a", svc.config.max_pinned_adapters))
    state = svc.describe()  # loaded by the sync after the pin, before any request for it
    assert [r["adapter"] for r in state["resident"] if r["pinned"]] == ["t-a@v1"]
    reads = _count_reads(svc)
    for name in ("b", "c", "b", "c", "b"):
        assert tools.ask(svc, f"t-{name}").status == 200
    state = svc.describe()
    assert "t-a@v1" in {r["adapter"] for r in state["resident"]}
    assert "t-a@v1" in {a["adapter"] for a in state["host_tier"]["adapters"]}
    assert reads.count("t-a@v1") == 0 and state["counters"]["evictions_pinned"] == 0
    assert tools.ask(svc, "t-a").body["text"] == tools.expected(svc, tiny_adapters["a"])
    assert svc.describe()["last_acquire"]["source"] == "device"
    # idle eviction skips it too
    svc.residency.idle_ttl_s = 1e-6
    time.sleep(0.01)
    assert [r["adapter"] for r in svc.describe()["resident"]] == ["t-a@v1"]
    # unpinned: an ordinary adapter again
    assert _seen(svc, lambda: svc.registry.unpin("t-a"))
    assert svc.describe()["resident"] == []


def test_the_pin_bound_in_the_registry_and_in_each_worker(make_service, tools, tiny_adapters):
    svc = make_service(num_slots=5, max_pinned_adapters=2)
    for name in ("a", "b", "c"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    reg = svc.registry
    assert reg.pin("t-a", 2) and reg.pin("t-b", 2) and not reg.pin("t-a", 2)
    with pytest.raises(PinLimitReached, match="2 tenant.*t-a, t-b.*max_pinned_adapters is 2"):
        reg.pin("t-c", 2)
    assert reg.pinned() == ["t-a", "t-b"]
    _seen(svc, lambda: reg.pin("t-c", 3))  # a tenantctl with a larger bound than this worker's
    assert svc.describe()["pinned"] == ["t-a@v1", "t-b@v1"]  # the worker keeps its own bound, first pinned first
    assert reg.remove("t-a") and reg.pinned() == ["t-b", "t-c"]  # removal unpins


def test_prefetch_of_a_list_and_the_most_used_at_start(make_service, tools, tiny_adapters, tiny_model_dir, tmp_path):
    svc = make_service(num_slots=4)  # two resident adapters
    for name in ("a", "b", "c"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    tools.onboard(svc, "t-broken", tiny_adapters["a"])
    weights = svc.store.path_for(svc.registry.get("t-broken")) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # altered in the store: refused, quarantined
    svc.residency.uses_flush_s = 0
    for name in ("c", "c", "b", "c", "b", "a"):
        assert tools.ask(svc, f"t-{name}").status == 200
    svc.describe()  # flushes the use counts
    assert svc.registry.most_used(2) == ["t-c", "t-b"]
    cfg = dataclasses.replace(svc.config, prefetch_tenants=("t-a", "nobody", "t-broken"), prefetch_top_n=2)
    worker = LoraplexService.from_model_dir(tiny_model_dir, cfg)  # a second worker on the same registry/store
    try:
        state = worker.describe()
        assert worker.requests == 0
        assert [r["adapter"] for r in state["resident"]] == ["t-c@v1", "t-a@v1"]  # the list first, then top-N
        assert {a["adapter"] for a in state["host_tier"]["adapters"]} == {"t-a@v1", "t-c@v1", "t-b@v1"}
        assert {e["adapter"]: e["form"] for e in state["host_tier"]["adapters"]}["t-b@v1"] == "bytes"  # no slot yet
        assert "t-broken@v1" in state["quarantined"] and state["counters"]["load_failures"] == 1
        reads = _count_reads(worker)
        for name in ("a", "c", "b"):
            reply = tools.ask(worker, f"t-{name}")
            assert reply.status == 200 and reply.body["text"] == tools.expected(worker, tiny_adapters[name])
        assert reads == []  # a and c were resident, b in the tier
        forms = {e["adapter"]: e["form"] for e in worker.describe()["host_tier"]["adapters"]}
        assert forms == {"t-a@v1": "image", "t-c@v1": "image", "t-b@v1": "image"}  # b's bytes: an image once loaded
        assert worker.describe()["last_acquire"] == {"adapter": "t-b@v1", "source": "host",
                                                     "load_ms": worker.describe()["last_acquire"]["load_ms"]}
    finally:
        worker.stop()


def test_pinned_tenants_are_loaded_at_start(make_service, tools, tiny_adapters, tiny_model_dir):
    svc = make_service(num_slots=4)
    for name in ("a", "b"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    svc.registry.pin("t-b", 4)
    worker = LoraplexService.from_model_dir(tiny_model_dir, svc.config)
    try:
        state = worker.describe()
        assert state["pinned"] == ["t-b@v1"] and [r["adapter"] for r in state["resident"]] == ["t-b@v1"]
    finally:
        worker.stop()


def test_removal_and_rollback_drop_stale_versions_from_the_tier(make_service, tools, tiny_adapters):
    svc = make_service(num_slots=3)
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard(svc, "zeta", tiny_adapters["c"])
    assert tools.ask(svc, "acme").body["adapter"] == "acme@v1"
    _seen(svc, lambda: tools.onboard(svc, "acme", tiny_adapters["b"]))
    assert tools.ask(svc, "acme").body["text"] == tools.expected(svc, tiny_adapters["b"])
    held = lambda: {a["adapter"] for a in svc.describe()["host_tier"]["adapters"]}  # noqa: E731
    assert held() == {"acme@v2"}  # v1 left both tiers when v2 became current
    assert tools.ask(svc, "zeta").status == 200
    _seen(svc, lambda: svc.registry.rollback("acme", to_version=1))
    assert held() == {"zeta@v1"}
    reads = _count_reads(svc)
    assert tools.ask(svc, "acme").body["text"] == tools.expected(svc, tiny_adapters["a"])
    assert reads == ["acme@v1"]
    _seen(svc, lambda: svc.registry.remove("acme"))
    state = svc.describe()
    assert held() == {"zeta@v1"} and state["resident"] == []


def test_an_unreachable_registry_at_start_is_logged_not_fatal(tiny_model_dir, tmp_path, caplog):
    cfg = LoraplexConfig.from_mapping({"redis_url": "redis://127.0.0.1:1/0", "adapter_store": str(tmp_path / "s"),
                                       "num_slots": 4, "prefetch_tenants": "acme", "prefetch_top_n": 3})
    worker = LoraplexService.from_model_dir(tiny_model_dir, cfg)
    try:
        assert worker.describe()["resident"] == [] and worker.describe()["pinned"] == []
        text = caplog.text
        assert "could not read the pinned tenants" in text and "could not read the most used" in text
        assert "tenant 'acme' skipped" in text
    finally:
        worker.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_worker_holds_the_bytes_in_pinned_memory():
    tier = HostTier(1 << 20, pin=True)
    assert tier.put("a", "a@v1", AdapterBytes.of(b"{}", b"w" * 1000))
    assert tier.get("a@v1").buffer.is_pinned() and bytes(tier.get("a@v1").weights) == b"w" * 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_slot_image_is_pinned_and_reloads_the_slot_bit_for_bit(tiny_model_dir, tiny_adapters):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).to("cuda").eval()
    engine = make_engine("multilora", model, EngineSettings(num_slots=4, max_rank=16), eos_token_ids=[0],
                         pad_token_id=0)
    facade = engine.model
    for name in ("a", "c"):
        engine.load_adapter(AdapterBytes.read_dir(tiny_adapters[name]), name)
    row = facade.pool[facade.slot_of("c")].clone()
    image = engine.slot_image("c")
    assert image.data.is_pinned() and image.data.device.type == "cpu"
    engine.delete_adapter("c")
    engine.load_adapter(tiny_adapters["b"], "b")  # the image lands in another slot
    engine.load_image(image, "c")
    torch.cuda.synchronize()
    assert facade.slot_of("c") != facade.slot_of("b") and torch.equal(facade.pool[facade.slot_of("c")], row)


def test_a_reload_from_the_host_tier_loads_the_slot_image(make_service, tools, tiny_adapters, monkeypatch):
    """What the tier holds for the multilora engine is the slot image the store load left: a reload
    parses nothing and copies no bytes into the engine's staging memory (`load_image`, not
    `load_adapter`), and the slot ends up with exactly the weights a load from the store wrote."""
    from handler.engine.multilora import model as model_module, slot_loader

    svc = make_service(num_slots=3)  # one resident adapter: every switch evicts
    for name in ("a", "b"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    calls: list[str] = []
    for fn in ("copy_data", "tensor_view"):
        real = getattr(slot_loader, fn)
        monkeypatch.setattr(slot_loader, fn, lambda *a, _r=real, _n=fn, **k: (calls.append(_n), _r(*a, **k))[1])
    real_read = model_module.read_adapter
    monkeypatch.setattr(model_module, "read_adapter", lambda *a, **k: (calls.append("parse"), real_read(*a, **k))[1])
    facade = svc.engine.model

    def slot_weights(adapter_id: str) -> torch.Tensor:
        return facade.pool[facade.slot_of(adapter_id)].clone()

    assert tools.ask(svc, "t-a").status == 200
    from_store = slot_weights("t-a@v1")
    assert calls[:2] == ["parse", "copy_data"] and svc.describe()["last_acquire"]["source"] == "store"
    assert tools.ask(svc, "t-b").status == 200
    n = len(calls)
    assert tools.ask(svc, "t-a").status == 200
    assert svc.describe()["last_acquire"]["source"] == "host" and len(calls) == n  # no parse, no views, no copy
    assert torch.equal(slot_weights("t-a@v1"), from_store)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_image_made_from_the_bytes_is_pinned_and_what_a_load_leaves_bit_for_bit(tiny_model_dir, tiny_adapters,
                                                                                        tmp_path):
    """The CUDA pool's conversion runs on the device in a load from bytes and on the host in
    `image_from_bytes`: the two must round alike (bf16 pool; fp32 and bf16 files)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).to("cuda").eval()
    engine = make_engine("multilora", model, EngineSettings(num_slots=4, max_rank=16), eos_token_ids=[0],
                         pad_token_id=0)
    facade = engine.model
    for name, adapter_dir in {**tiny_adapters, "c-bf16": _bf16_copy(tiny_adapters["c"], tmp_path / "c16")}.items():
        image = engine.image_from_bytes(AdapterBytes.read_dir(adapter_dir))
        assert image.data.is_pinned() and image.data.device.type == "cpu"
        engine.load_adapter(AdapterBytes.read_dir(adapter_dir), name)
        row = facade.pool[facade.slot_of(name)].clone()
        taken = engine.slot_image(name)
        assert (image.runs, image.ranks, image.scales) == (taken.runs, taken.ranks, taken.scales), name
        assert torch.equal(image.data, taken.data), name
        engine.delete_adapter(name)
        engine.load_image(image, name)
        torch.cuda.synchronize()
        assert torch.equal(facade.pool[facade.slot_of(name)], row), name
        engine.delete_adapter(name)


def test_an_image_takes_plain_memory_when_no_page_locked_memory_is_left(monkeypatch, caplog):
    """`slot_loader.host_tensor`, where `image_from_bytes` allocates a CUDA pool's images: a failed
    page-locked allocation must not fail the load (the fetch thread would quarantine the adapter)."""
    from handler.engine.multilora import slot_loader

    real = torch.empty

    def no_pinned(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real(*args, **kwargs)

    monkeypatch.setattr(slot_loader.torch, "empty", no_pinned)
    out = slot_loader.host_tensor(10, torch.bfloat16, pin=True)
    assert out.numel() == 10 and out.dtype == torch.bfloat16 and not out.is_pinned()
    assert "no page-locked memory for 20 bytes" in caplog.text
