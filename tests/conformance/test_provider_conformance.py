"""The contract every provider keeps, run against each cloud's fake through one adapter.

See conftest.py for the adapters; a provider that passes here can sit behind the
scaler and reaper without either knowing which cloud it is.
"""

from __future__ import annotations

import pytest

from orchestrator.providers.base import TAG_ID, TAG_POOL, TAG_RUNNER, CapacityError, ProviderError

ORCH_ID = "orch-conf"
POOL = "conf-pool"

FOREIGN_TAGS = {
    "other-orchestrator": {TAG_ID: "another-orchestrator", TAG_POOL: POOL, TAG_RUNNER: "x"},
    "untagged": {},
}


def _by_id(instances):
    return {i.instance_id: i for i in instances}


def test_launch_is_listed_with_our_tags_then_terminate_makes_it_gone(adapter):
    p = adapter.provider
    spec = adapter.spec("501-1-1")
    where = p.location_of(adapter.candidate)

    inst = p.launch(spec)

    assert inst.cloud == p.cloud
    assert inst.name == spec.name
    assert inst.location == where
    assert inst.spot == adapter.candidate.spot
    assert inst.state in ("pending", "running")
    listed = _by_id(p.list_managed([where]))
    assert inst.instance_id in listed
    seen = listed[inst.instance_id]
    assert seen.tags[TAG_ID] == ORCH_ID
    assert seen.tags[TAG_POOL] == POOL
    assert seen.tags[TAG_RUNNER] == spec.name
    assert seen.pool == POOL and seen.name == spec.name

    p.terminate(inst.instance_id, inst.location)

    assert inst.instance_id not in _by_id(p.list_managed([where]))
    assert not adapter.exists(inst.instance_id, inst.location)
    p.terminate(inst.instance_id, inst.location)  # already gone is not an error
    assert adapter.violations() == []


def test_relaunch_with_the_same_launch_key_makes_no_second_vm(adapter):
    p = adapter.provider
    spec = adapter.spec("502-1-1")
    first = p.launch(spec)
    second = p.launch(spec)
    assert second.instance_id == first.instance_id
    assert adapter.live_count() == 1
    named = [i for i in p.list_managed([p.location_of(adapter.candidate)]) if i.name == spec.name]
    assert len(named) == 1


def test_capacity_error_is_mapped_and_leaves_nothing_running(adapter):
    p = adapter.provider
    spec = adapter.spec("503-1-1")
    adapter.inject_capacity_error()
    with pytest.raises(CapacityError):
        p.launch(spec)
    where = p.location_of(adapter.candidate)
    assert not [i for i in p.list_managed([where]) if i.state in ("pending", "running")]
    # The failure was for that request only: the next launch attempt goes through.
    assert p.launch(adapter.spec("503-1-2")).state in ("pending", "running")


@pytest.mark.parametrize("kind", sorted(FOREIGN_TAGS))
def test_foreign_instances_are_never_listed_or_touched(adapter, kind):
    p = adapter.provider
    ours = p.launch(adapter.spec("504-1-1"))
    foreign_id, foreign_where = adapter.create_foreign(FOREIGN_TAGS[kind])
    where = p.location_of(adapter.candidate)

    listed = _by_id(p.list_managed([where, foreign_where]))
    assert foreign_id not in listed
    assert set(listed) == {ours.instance_id}

    try:
        p.terminate(foreign_id, foreign_where)
    except ProviderError:
        pass  # refusing loudly is fine; deleting is not
    assert adapter.exists(foreign_id, foreign_where)


def test_every_candidate_has_a_positive_price(adapter):
    for cand in adapter.candidates:
        assert adapter.provider.price_per_hour(cand) > 0, cand.key()
        assert adapter.provider.expected_gpus(cand) >= 0
    assert adapter.provider.min_billing_seconds >= 0
