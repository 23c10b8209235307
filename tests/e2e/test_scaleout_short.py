"""Short scale-out run in CI (bench/scaleout.py runs the full one): 3 real TorchServes with
one resident adapter each, on one private redis-server and one adapter store, behind the
shipped nginx config (scripts/nginx/loraplex-tenant-hash.conf) and behind a round-robin
nginx over the same instances; 12 tenants with Zipf popularity, every answer's status,
``adapter``, ``fallback`` and text checked against PEFT (`loraplex_testing.scaleout`).
Needs the Debian nginx (scripts/install.sh installs it)."""
import pytest

from loraplex_testing.scaleout import run_scaleout

pytestmark = pytest.mark.e2e


def test_tenant_hashing_keeps_each_tenant_on_one_instance_and_cuts_cold_loads(tmp_path):
    r = run_scaleout(tmp_path, instances=3, capacity=1, requests=120, zipf_s=1.2, concurrency=4, prompts=2,
                     max_new_tokens=4, seed=3, start_timeout=240)
    failures = {k: r["phases"][p][k] for p in r["phases"] for k in
                ("transport_errors", "errors_4xx", "errors_5xx", "wrong_outputs")}
    assert r["failures"] == 0, (failures, r["phases"]["hash"]["examples"], r["phases"]["round_robin"]["examples"],
                                r["rollout_wrong_examples"])
    assert r["phases"]["hash"]["ok"] == r["phases"]["round_robin"]["ok"] == 120
    # nginx sent every tenant's requests to one instance; round robin spread them
    assert r["hash_tenants_on_one_instance"] == r["hash_tenants_seen"] >= 8, r
    assert r["round_robin_tenants_on_one_instance"] < r["hash_tenants_seen"] / 2, r
    # cold loads (store reads): one per tenant under hashing (the host tier keeps every adapter here)
    assert r["cold_loads_hash"] == r["hash_tenants_seen"] < r["cold_loads_round_robin"], r
    assert r["slot_loads_hash"] < r["slot_loads_round_robin"], r  # and fewer reloads into the slots
    # every instance serves the new version soon after `tenantctl onboard` (Redis events)
    assert r["rollout_s"] is not None and r["rollout_s"] < 10, r["rollout_per_instance_s"]
    assert r["rollout_to"].endswith("@v2")
