"""loraplex_testing/archive.py's model-config derivations (pure): the shipped model-config.yaml is
the continuous kind; `scheduler="static"` gives TorchServe batching and a synchronous worker; an
asynchronous worker is never batched (TorchServe 0.12's frontend fails on it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplex_testing.archive import check_serving, serving_config, with_batching

SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[1] / "model-config.yaml").read_text())


def test_the_shipped_config_is_the_continuous_kind():
    assert serving_config(SHIPPED, "continuous") == SHIPPED
    check_serving(SHIPPED)


def test_static_kind_is_synchronous_and_batched():
    static = serving_config(SHIPPED, "static")
    assert "asyncCommunication" not in static
    assert (static["batchSize"], static["maxBatchDelay"], static["handler"]["scheduler"]) == (8, 20, "static")
    assert {k: v for k, v in static["handler"].items() if k != "scheduler"} == \
        {k: v for k, v in SHIPPED["handler"].items() if k != "scheduler"}
    back = serving_config(static, "continuous")
    assert back["asyncCommunication"] is True and back["batchSize"] == 1 and "maxBatchDelay" not in back
    with pytest.raises(ValueError, match="scheduler must be one of"):
        serving_config(SHIPPED, "fast")


def test_an_asynchronous_worker_is_never_batched():
    assert with_batching(SHIPPED, 4, 200) == SHIPPED
    static = with_batching(serving_config(SHIPPED, "static"), 4, 200)
    assert (static["batchSize"], static["maxBatchDelay"]) == (4, 200)
    with pytest.raises(ValueError, match="asyncCommunication needs batchSize 1"):
        check_serving({**SHIPPED, "batchSize": 4})
