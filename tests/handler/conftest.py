"""Fixtures for the request-path tests: a LoraplexService over the session's tiny
random Llama and private redis-server (no TorchServe), and `tools`, the few
helpers every such test uses (onboard with the real onboarding code, ask one
request, PEFT's expected text)."""
from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

from handler.service import LoraplexService, RawRequest
from loraplex_common.config import LoraplexConfig
from loraplex_testing.oracle import reference_generate
from tenant_registry.onboarding import onboard
from tenant_registry.validate import BaseModelSpec

NEW = 6  # new tokens per request in these tests
_prefixes = itertools.count()


def service_config(redis_url: str, store: Path, **overrides) -> LoraplexConfig:
    return LoraplexConfig.from_mapping({
        "redis_url": redis_url, "redis_prefix": f"svc{next(_prefixes)}", "adapter_store": str(store),
        "num_slots": 4, "idle_ttl_s": 600, "max_new_tokens_cap": 32, "max_prompt_tokens": 64,
        "negative_cache_s": 60, "registry_cache_s": 30, **overrides})


@pytest.fixture
def make_service(tiny_model_dir, redis_url, tmp_path):
    """make_service(**config overrides) -> a started LoraplexService (stopped at teardown)."""
    made = []

    def build(**overrides) -> LoraplexService:
        cfg = service_config(redis_url, tmp_path / f"store{len(made)}", **overrides)
        svc = LoraplexService.from_model_dir(tiny_model_dir, cfg)
        made.append(svc)
        return svc

    yield build
    for svc in made:
        svc.stop()


@pytest.fixture
def tools(tiny_model_dir):
    def onboard_tenant(svc: LoraplexService, tenant: str, adapter_dir: Path):
        spec = BaseModelSpec.from_model_dir(svc.config.base_model_dir or tiny_model_dir)
        return onboard(svc.registry, svc.store, spec, tenant, adapter_dir, svc.config)

    def ask(svc: LoraplexService, tenant: str | None, prompt: str = "hello world", *,
            headers: dict | None = None, **fields):
        sent = {"X-Tenant-ID": tenant} if tenant else {}
        sent.update(headers or {})
        return svc.handle_batch([RawRequest({"prompt": prompt, "max_new_tokens": NEW, **fields}, sent)])[0]

    def ids(svc: LoraplexService, prompt: str = "hello world") -> list[int]:
        return svc.tokenizer(prompt)["input_ids"]

    def expected(svc: LoraplexService, adapter_dir: Path | None, prompt: str = "hello world", *,
                 input_ids=None, new: int = NEW) -> str:
        """PEFT's greedy text for `prompt` (or for `input_ids`) with the adapter (None = base)."""
        token_ids = list(input_ids) if input_ids is not None else ids(svc, prompt)
        return svc.tokenizer.decode(reference_generate(tiny_model_dir, adapter_dir, token_ids, new),
                                    skip_special_tokens=True)

    return SimpleNamespace(onboard=onboard_tenant, ask=ask, ids=ids, expected=expected, new=NEW)
