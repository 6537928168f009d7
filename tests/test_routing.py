"""Labels -> pool (core/routing.py), alone and through the webhook and the scaler."""

from __future__ import annotations

import pytest

from orch_support import job_payload, make_config, post_webhook
from orchestrator.config import load_config_text
from orchestrator.core.routing import candidates_for_arch, effective_labels, route, runner_labels

ROUTING_CONFIG = """
github:
  simulated: true
  webhook_secret: {secret}
  allowed_repositories: ["octo-org/*"]
database:
  url: {db}
pools:
  - name: gpu-t4
    labels: [gpu-t4, GPU]
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, price_per_hour: 0.25}}
  - name: gpu-t4-big
    labels: [gpu-t4, big]
    candidates:
      - {{cloud: sandbox, instance_type: gpu-t4-sim, price_per_hour: 0.50}}
  - name: arm
    labels: [graviton]
    candidates:
      - {{cloud: sandbox, instance_type: arm-sim, arch: arm64, price_per_hour: 0.10}}
  - name: both
    labels: [cpu]
    candidates:
      - {{cloud: sandbox, instance_type: cpu-x64-sim, price_per_hour: 0.10}}
      - {{cloud: sandbox, instance_type: cpu-arm-sim, arch: arm64, price_per_hour: 0.08}}
"""


def routing_config(text: str = ROUTING_CONFIG):
    return load_config_text(text.format(secret="s3cret-value", db="sqlite:///unused.db"), "<routing>", env={})


@pytest.fixture(scope="module")
def cfg():
    return routing_config()


def pool_of(cfg, labels):
    r = route(cfg, labels)
    return None if r is None else r.pool.name


@pytest.mark.parametrize(
    "labels, pool",
    [
        (["self-hosted", "gpu-t4"], "gpu-t4"),
        (["Self-Hosted", "GPU-T4"], "gpu-t4"),
        (["SELF-HOSTED", "Linux", "X64", "gpu"], "gpu-t4"),
        (["self-hosted", "linux", "x64", "gpu-t4"], "gpu-t4"),
        (["gpu-t4"], "gpu-t4"),
        (["self-hosted", "gpu-t4", "big"], "gpu-t4-big"),  # only the second pool covers `big`
        (["self-hosted", "graviton"], "arm"),
        (["self-hosted", "linux", "ARM64", "graviton"], "arm"),
        (["self-hosted", "cpu", "arm64"], "both"),
        (["self-hosted", "cpu", "x64"], "both"),
    ],
)
def test_routes(cfg, labels, pool):
    assert pool_of(cfg, labels) == pool


@pytest.mark.parametrize(
    "labels",
    [
        ["ubuntu-latest"],
        ["self-hosted", "gpu-a100"],
        ["self-hosted", "gpu-t4", "windows"],
        ["self-hosted", "gpu-t4", "arm64"],  # gpu pools are x64 only
        ["self-hosted", "graviton", "x64"],  # and the arm pool is arm64 only
        ["self-hosted", "gpu-t4", "macos"],
        [],
        ["", "  "],
    ],
)
def test_unmatched_labels_route_nowhere(cfg, labels):
    assert route(cfg, labels) is None


def test_first_pool_in_config_order_wins(cfg):
    # Both gpu pools cover [self-hosted, gpu-t4]; the first one listed takes it.
    assert pool_of(cfg, ["self-hosted", "gpu-t4"]) == "gpu-t4"
    reordered = ROUTING_CONFIG.replace("  - name: gpu-t4\n    labels: [gpu-t4, GPU]", "  - name: gpu-t4-first\n    labels: [gpu-t4, GPU]")
    first = routing_config(reordered.replace("name: gpu-t4-big", "name: aaa-big"))
    assert pool_of(first, ["self-hosted", "gpu-t4"]) == "gpu-t4-first"


def test_effective_labels(cfg):
    assert effective_labels(cfg.pool("gpu-t4")) == ["self-hosted", "linux", "x64", "gpu-t4", "GPU"]
    assert effective_labels(cfg.pool("arm"), "arm64") == ["self-hosted", "linux", "arm64", "graviton"]


def test_unique_runner_form(cfg):
    r = route(cfg, ["self-hosted", "gpu-t4--run42-0"])
    assert r.pool.name == "gpu-t4" and r.unique_label == "gpu-t4--run42-0"
    cand = r.pool.candidates[0]
    assert runner_labels(r.pool, cand, r.unique_label) == ["self-hosted", "linux", "x64", "gpu-t4--run42-0"]
    # Mixed case, and the suffix can hold anything GitHub expressions produce.
    r = route(cfg, ["Self-Hosted", "GPU-T4--9876543210-3"])
    assert r.pool.name == "gpu-t4" and r.unique_label == "GPU-T4--9876543210-3"


@pytest.mark.parametrize(
    "labels",
    [
        ["self-hosted", "gpu-t4--"],  # no suffix
        ["self-hosted", "nothing--run1"],  # no such pool label
        ["self-hosted", "self-hosted--run1"],  # base labels are not pool labels
        ["self-hosted", "gpu-t4--a", "gpu-t4--b"],  # one runner carries one unique label
    ],
)
def test_unique_form_that_does_not_route(cfg, labels):
    assert route(cfg, labels) is None


def test_plain_runner_labels(cfg):
    pool = cfg.pool("both")
    assert runner_labels(pool, pool.candidates[0], None) == ["self-hosted", "linux", "x64", "cpu"]
    assert runner_labels(pool, pool.candidates[1], None) == ["self-hosted", "linux", "arm64", "cpu"]


def test_arm64_candidates(cfg):
    pool = cfg.pool("both")
    assert [c.instance_type for _, c in candidates_for_arch(pool, ["self-hosted", "cpu", "ARM64"])] == ["cpu-arm-sim"]
    assert [c.instance_type for _, c in candidates_for_arch(pool, ["self-hosted", "cpu", "x64"])] == ["cpu-x64-sim"]
    # No architecture named: the whole chain, in order, with original indexes.
    assert [(i, c.instance_type) for i, c in candidates_for_arch(pool, ["self-hosted", "cpu"])] == [
        (0, "cpu-x64-sim"),
        (1, "cpu-arm-sim"),
    ]


# --- through the webhook and the scaler ------------------------------------------------


def _launch(make_orch, client_for, labels, *, repo="octo-org/models", job_id=31):
    orch = make_orch()
    client = client_for(orch)
    r = post_webhook(client, job_payload(job_id=job_id, labels=labels, repo=repo))
    assert r.status_code == 202, r.text
    return orch, r.json()["result"], orch.scaler.run_once()


def test_mixed_case_labels_launch(make_orch, client_for):
    orch, result, outcomes = _launch(make_orch, client_for, ["Self-Hosted", "GPU-T4"])
    assert result == "queued" and orch.store.get_job(31).pool == "gpu-t4"
    assert [o.result for o in outcomes] == ["launched"]
    inst = orch.store.get_instance(outcomes[0].instance)
    assert inst.labels == ["self-hosted", "linux", "x64", "gpu-t4"]


def test_linux_x64_labels_launch(make_orch, client_for):
    orch, result, outcomes = _launch(make_orch, client_for, ["self-hosted", "linux", "x64", "k8s"])
    assert [o.result for o in outcomes] == ["launched"]
    assert orch.store.get_instance(outcomes[0].instance).pool == "k8s"


def test_unique_runner_launch_carries_only_its_label(make_orch, client_for):
    orch, result, outcomes = _launch(make_orch, client_for, ["self-hosted", "gpu-t4--run42-0"])
    assert result == "queued"
    job = orch.store.get_job(31)
    assert (job.pool, job.unique_label) == ("gpu-t4", "gpu-t4--run42-0")
    inst = orch.store.get_instance(outcomes[0].instance)
    assert inst.labels == ["self-hosted", "linux", "x64", "gpu-t4--run42-0"]
    assert "gpu-t4" not in inst.labels
    # The runner GitHub knows has the same labels, so no other gpu-t4 job can take it.
    gh_runner = next(r for r in orch.github.runners.values() if r.name == inst.id)
    assert gh_runner.labels == ["self-hosted", "linux", "x64", "gpu-t4--run42-0"]


def test_unmatched_labels_launch_nothing(make_orch, client_for):
    orch, result, outcomes = _launch(make_orch, client_for, ["self-hosted", "gpu-h100"])
    assert result == "ignored:no-matching-pool"
    assert orch.store.get_job(31).state == "ignored"
    assert outcomes == [] and orch.sandbox_world.live() == []


def test_repository_outside_allow_list_launches_nothing(make_orch, client_for):
    orch, result, outcomes = _launch(make_orch, client_for, ["self-hosted", "gpu-t4"], repo="evil-org/models")
    assert result == "ignored:repository-not-allowed"
    assert outcomes == [] and orch.sandbox_world.live() == []


def test_allow_list_is_a_case_insensitive_glob(make_orch, client_for):
    orch, result, outcomes = _launch(make_orch, client_for, ["self-hosted", "gpu-t4"], repo="OCTO-ORG/Models")
    assert result == "queued" and [o.result for o in outcomes] == ["launched"]
    # `octo-org/*` does not cover a look-alike owner.
    orch, result, _ = _launch(make_orch, client_for, ["self-hosted", "gpu-t4"], repo="octo-org-evil/models", job_id=32)
    assert result == "ignored:repository-not-allowed"


def test_arm64_job_gets_an_arm64_vm(make_orch, client_for, sqlite_url):
    orch = make_orch(make_config(sqlite_url, text=ROUTING_CONFIG))
    client = client_for(orch)
    post_webhook(client, job_payload(job_id=41, labels=["self-hosted", "cpu", "arm64"]))
    post_webhook(client, job_payload(job_id=42, labels=["self-hosted", "cpu"]))
    outcomes = {o.job_id: o for o in orch.scaler.run_once()}
    arm = orch.store.get_instance(outcomes[41].instance)
    assert (arm.instance_type, arm.labels) == ("cpu-arm-sim", ["self-hosted", "linux", "arm64", "cpu"])
    x64 = orch.store.get_instance(outcomes[42].instance)
    assert (x64.instance_type, x64.labels) == ("cpu-x64-sim", ["self-hosted", "linux", "x64", "cpu"])
