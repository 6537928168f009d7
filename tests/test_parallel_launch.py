"""A burst is launched by several workers at once; claims, max_runners and budgets stay exact."""

from __future__ import annotations

import threading

from orch_support import make_config, job_payload, post_webhook


def test_a_burst_is_launched_in_parallel_and_max_runners_still_holds(make_orch, client_for, sqlite_url):
    orch = make_orch(make_config(sqlite_url, max_runners=6))
    client = client_for(orch)
    launch = orch.providers["sandbox"].launch
    # The first two launches wait for each other: a serial scaler would break the barrier.
    together = threading.Barrier(2, timeout=10)
    met = []
    guard = threading.Lock()

    def slow_launch(spec):
        with guard:
            first_two = len(met) < 2
            if first_two:
                met.append(spec.name)
        if first_two:
            together.wait()
        return launch(spec)

    orch.providers["sandbox"].launch = slow_launch
    for job_id in range(100, 110):
        post_webhook(client, job_payload("queued", job_id=job_id))
    outcomes = orch.scaler.run_once()
    launched = [o for o in outcomes if o.result == "launched"]
    assert len(launched) == 6, [o.result for o in outcomes]
    assert all(o.result == "held:max_runners" for o in outcomes if o.result != "launched")
    assert len(met) == 2 and not together.broken, "launches should overlap"
    assert len(orch.sandbox_world.live()) == 6
    per_job = {}
    for inst in orch.store.live_instances():
        per_job[inst.job_id] = per_job.get(inst.job_id, 0) + 1
    assert set(per_job.values()) == {1}
