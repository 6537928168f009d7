"""The simulator: short traces through the real orchestrator in simulated time."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.sim.simulate import REQUIRED_KEYS, simulate
from orchestrator.sim.trace import SimOptions, TraceJob, load_trace

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "simulate.yaml"
FIGURE_KEYS = [k for k in REQUIRED_KEYS if k != "baselines"]


def short_trace(n: int = 16, seed: int = 7, span: float = 900.0) -> list[TraceJob]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        labels = ("self-hosted", "gpu-t4") if i % 3 else ("self-hosted", "linux", "cpu-large")
        if i % 7 == 3:
            labels = ("self-hosted", f"gpu-t4--{i}-0")  # unique-runner form
        out.append(TraceJob(round(rng.uniform(0, span), 1), "sim-org/models", labels, float(rng.randint(60, 600))))
    return sorted(out, key=lambda j: j.t)


@pytest.fixture(scope="module")
def config():
    return load_config(CONFIG)


def test_short_trace_invariants(config):
    report = simulate(config, short_trace(), SimOptions(), seed=3)
    for key in REQUIRED_KEYS:
        assert key in report, key
    assert report["jobs"] == 16
    assert report["lost_jobs"] == 0
    assert report["leaked_vms"] == 0
    assert report["budget_overshoot_usd"] == 0
    assert report["duplicate_vms"] == 0
    assert report["store_live_instances_at_end"] == 0
    assert set(report["baselines"]) == {"cml", "cml-spot", "tf-aws", "ideal"}
    for name, fig in report["baselines"].items():
        for key in FIGURE_KEYS:
            assert key in fig, (name, key)
        assert fig["lost_jobs"] == 0, name
        assert "cost_usd" in fig["ratio"]
    # Reusable runners sit idle for minutes; ephemeral ones do not.
    assert report["idle_vm_s"] < report["baselines"]["cml"]["idle_vm_s"]


def test_deterministic_for_a_seed(config):
    trace = short_trace(12, seed=11, span=1500)
    a = simulate(config, trace, SimOptions(baselines=["ideal", "cml"]), seed=5)
    b = simulate(config, trace, SimOptions(baselines=["ideal", "cml"]), seed=5)
    assert a == b
    c = simulate(config, trace, SimOptions(baselines=[]), seed=6)
    assert c["boot_s"] != a["boot_s"]  # the seed does reach the world


def test_lost_webhooks_are_found_by_the_backstop(config):
    report = simulate(config, short_trace(20, seed=13), SimOptions(webhook_loss_rate=0.3, webhook_dup_rate=0.1, baselines=[]), seed=2)
    assert report["webhooks_lost"] > 0
    assert report["backstop_found"] > 0
    assert report["lost_jobs"] == 0
    assert report["leaked_vms"] == 0
    assert report["duplicate_vms"] == 0
    # A lost webhook's job waits for the poll (detection), not for our decision once it is found.
    assert report["detection_delay_s"]["max"] > 0
    assert report["queued_to_launch_request_ms"]["p99"] > report["decision_delay_ms"]["p99"]


def _burst(n: int) -> list[TraceJob]:
    return [TraceJob(0.0, "sim-org/models", ("self-hosted", "gpu-t4"), 120.0) for _ in range(n)]


def test_a_burst_is_requested_at_once_with_enough_launch_workers(config):
    report = simulate(config, _burst(40), SimOptions(baselines=[]), seed=4)
    assert config.server.launch_concurrency >= 40
    assert report["decision_delay_ms"]["p99"] == 0.0
    assert report["lost_jobs"] == 0


def test_a_burst_waits_for_free_launch_workers(config):
    few = config.model_copy(update={"server": config.server.model_copy(update={"launch_concurrency": 4})})
    report = simulate(few, _burst(40), SimOptions(baselines=[], cloud_api_latency_s=1.0, github_api_latency_s=0.0, sandbox={"capacity_error_rate": 0.0}), seed=4)
    # 40 launches through 4 lanes of 1 s: the last ten are requested 9 s in.
    assert report["decision_delay_ms"]["p99"] == pytest.approx(9000.0, abs=1.0)
    assert report["decision_delay_ms"]["p50"] == pytest.approx(4500.0, abs=500.0)
    assert report["lost_jobs"] == 0
    assert report["duplicate_vms"] == 0


def test_cml_style_runs_on_demand_unless_told_spot(config):
    report = simulate(config, short_trace(12, seed=17), SimOptions(baselines=["cml", "cml-spot"]), seed=8)
    cml, cml_spot = report["baselines"]["cml"], report["baselines"]["cml-spot"]
    assert cml["cost_usd"] == pytest.approx(cml["on_demand_cost_usd"])
    assert cml_spot["cost_usd"] < cml_spot["on_demand_cost_usd"]
    assert report["targets"]["cost_vs_cml"]["value"] == pytest.approx(report["cost_usd"] / cml["cost_usd"], rel=1e-3)


def test_spot_interruptions_are_rerun(config):
    trace = [TraceJob(float(i * 20), "sim-org/models", ("self-hosted", "gpu-t4"), 900.0) for i in range(6)]
    report = simulate(config, trace, SimOptions(sandbox={"spot_interruption_rate": 0.9}, baselines=[]), seed=5)
    assert report["interrupted_vms"] > 0
    assert report["reruns"] > 0
    assert report["lost_jobs"] == 0
    assert report["leaked_vms"] == 0


def test_a_tight_block_budget_is_never_overshot(config):
    # Each launch reserves 0.21 $/h x 6 h = $1.26; $3 lets two VMs run at once.
    budgets = [b.model_copy(update={"limit_usd": 3.0}) if b.name == "daily" else b for b in config.budgets]
    tight = config.model_copy(update={"budgets": budgets})
    trace = [TraceJob(float(i), "sim-org/models", ("self-hosted", "gpu-t4"), 120.0) for i in range(5)]
    report = simulate(tight, trace, SimOptions(baselines=[], scaler_tick_s=30), seed=1)
    assert report["budget_overshoot_usd"] == 0
    assert report["leaked_vms"] == 0
    assert report["budget_spent_usd"]["daily"] <= 3.0


def test_cli_writes_the_report(tmp_path, capsys):
    from orchestrator.cli import main

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(
        json.dumps({"t": j.t, "repo": j.repo, "labels": list(j.labels), "duration_s": j.duration_s}) + "\n"
        for j in short_trace(6, seed=19, span=300)
    ))
    (tmp_path / "t.yaml").write_text("simulator: {webhook_dup_rate: 0.5}\n")
    out = tmp_path / "report.json"
    assert main(["simulate", "--config", str(CONFIG), "--trace", str(trace), "--report", str(out), "--seed", "9", "--format", "table"]) == 0
    report = json.loads(out.read_text())
    for key in REQUIRED_KEYS:
        assert key in report, key
    for key in ("p50", "p95", "p99"):
        assert key in report["wait_s"]
    assert {"p50", "p99"} <= set(report["decision_delay_ms"])
    assert report["world"]["simulator"]["webhook_dup_rate"] == 0.5
    assert report["seed"] == 9
    assert "ours" in capsys.readouterr().out
    assert len(load_trace(trace)) == 6


def test_bad_trace_line_is_an_error(tmp_path, capsys):
    from orchestrator.cli import main

    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"t": 0, "repo": "sim-org/x", "labels": ["gpu-t4"]}\n')
    assert main(["simulate", "--config", str(CONFIG), "--trace", str(trace), "--report", str(tmp_path / "r.json")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
