"""Fixtures for the control-plane tests: a unique Redis prefix per test (so tests sharing the
session's real redis-server never see each other's keys), a registry, a store in tmp_path, and the
tiny base model's spec."""
from __future__ import annotations

import uuid

import pytest
import redis

from loraplex_common.config import LoraplexConfig
from tenant_registry.registry import TenantRegistry
from tenant_registry.store import AdapterStore
from tenant_registry.validate import BaseModelSpec


@pytest.fixture(scope="session")
def base_spec(tiny_model_dir) -> BaseModelSpec:
    return BaseModelSpec.from_model_dir(tiny_model_dir)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def raw_redis(redis_url):
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def registry(redis_url, prefix):
    reg = TenantRegistry(redis_url, prefix)
    yield reg
    reg.close()


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def config(redis_url, prefix, tmp_path, tiny_model_dir) -> LoraplexConfig:
    return LoraplexConfig.from_mapping({
        "redis_url": redis_url, "redis_prefix": prefix, "adapter_store": str(tmp_path / "store"),
        "base_model_dir": str(tiny_model_dir), "max_rank": 16, "max_adapter_bytes": 10_000_000})

