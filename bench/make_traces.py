"""Writes the benchmark traces in bench/traces/ (deterministic: fixed seeds).

    python bench/make_traces.py [--out bench/traces]

Each trace is JSON lines {"t", "repo", "labels", "duration_s"}; the world knobs a
trace is meant to run with (interruption rate, webhook loss) are in the YAML
overlay of the same name, which `orchestrator simulate` reads from beside it.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
from pathlib import Path

REPOS = ["sim-org/models", "sim-org/training", "sim-org/inference", "sim-org/data-pipeline", "sim-org/web"]
DAY = 86400.0

OVERLAYS = {
    "steady": "# One working day on the default world: 2% spot capacity errors, no interruptions.\nsimulator: {}\n",
    "bursty": "# Matrix bursts of 200 GPU jobs.\nsimulator: {}\n",
    "interruption-heavy": (
        "# 10% of spot VMs are interrupted 30-900 s after boot.\n"
        "sandbox: {spot_interruption_rate: 0.10}\n"
        "simulator: {}\n"
    ),
    "lossy": (
        "# GitHub loses 2% of webhooks and delivers 2% twice; the backstop poller finds the lost ones.\n"
        "simulator: {webhook_loss_rate: 0.02, webhook_dup_rate: 0.02}\n"
    ),
}


def lognormal(rng: random.Random, median: float, sigma: float, lo: float, hi: float) -> int:
    return int(min(max(rng.lognormvariate(math.log(median), sigma), lo), hi))


def diurnal(t: float) -> float:
    """Relative arrival rate over a UTC day: quiet nights, busy working hours."""
    hour = (t % DAY) / 3600.0
    work = max(math.sin(math.pi * (hour - 7.0) / 13.0), 0.0) if 7.0 <= hour <= 20.0 else 0.0
    return 0.15 + work


def sample_times(rng: random.Random, n: int, span: float, rate=diurnal) -> list[float]:
    """n arrival times on [0, span) with density proportional to `rate` (inverse CDF on a grid)."""
    step = 60.0
    grid = [i * step for i in range(int(span // step) + 1)]
    cdf, acc = [], 0.0
    for g in grid:
        acc += rate(g)
        cdf.append(acc)
    out = []
    for _ in range(n):
        u = rng.random() * acc
        k = bisect.bisect_left(cdf, u)
        out.append(min(grid[k] + rng.random() * step, span - 1))
    return sorted(out)


def mixed_job(rng: random.Random, t: float, run: int, k: int) -> dict:
    """A job of a mixed GPU/CPU workload; one in ten uses the unique-runner label form."""
    x = rng.random()
    repo = rng.choice(REPOS)
    if x < 0.10:
        return {"t": round(t, 3), "repo": repo, "labels": ["self-hosted", f"gpu-t4--{run}-{k}"],
                "duration_s": lognormal(rng, 600, 0.8, 60, 3 * 3600)}
    if x < 0.60:
        return {"t": round(t, 3), "repo": repo, "labels": ["self-hosted", "gpu-t4"],
                "duration_s": lognormal(rng, 600, 0.8, 60, 3 * 3600)}
    return {"t": round(t, 3), "repo": repo, "labels": ["self-hosted", "linux", "cpu-large"],
            "duration_s": lognormal(rng, 240, 0.7, 30, 3600)}


def workflow_runs(rng: random.Random, jobs: int, span: float) -> list[dict]:
    """Workflow runs of 1-4 jobs queued within a few seconds of each other, until `jobs` jobs."""
    sizes: list[int] = []
    while sum(sizes) < jobs:
        sizes.append(min(rng.choice([1, 1, 2, 2, 3, 4]), jobs - sum(sizes)))
    out: list[dict] = []
    for run, (t, size) in enumerate(zip(sample_times(rng, len(sizes), span), sizes), 1):
        for k in range(size):
            out.append(mixed_job(rng, t + rng.uniform(0, 3), run, k))
    return sorted(out, key=lambda j: j["t"])


def steady() -> list[dict]:
    return workflow_runs(random.Random(101), 2000, DAY)


def bursty() -> list[dict]:
    """Six matrix bursts of 200 GPU jobs over a working day, over a light background."""
    rng = random.Random(202)
    out = workflow_runs(rng, 120, 12 * 3600)
    for b in range(6):
        t0 = 1800 + b * 7200 + rng.uniform(-600, 600)
        repo = rng.choice(REPOS)
        for k in range(200):
            out.append({"t": round(t0 + rng.uniform(0, 5), 3), "repo": repo, "labels": ["self-hosted", "gpu-t4"],
                        "duration_s": lognormal(rng, 360, 0.5, 60, 3600)})
    return sorted(out, key=lambda j: j["t"])


def interruption_heavy() -> list[dict]:
    """Long spot GPU jobs over six hours: most outlive a 30-900 s interruption draw."""
    rng = random.Random(303)
    times = sample_times(rng, 600, 6 * 3600, rate=lambda t: 1.0)
    return [{"t": round(t, 3), "repo": rng.choice(REPOS), "labels": ["self-hosted", "gpu-t4"],
             "duration_s": lognormal(rng, 1500, 0.6, 120, 4 * 3600)} for t in times]


def lossy() -> list[dict]:
    return workflow_runs(random.Random(404), 1000, 12 * 3600)


TRACES = {"steady": steady, "bursty": bursty, "interruption-heavy": interruption_heavy, "lossy": lossy}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "traces"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    for name, make in TRACES.items():
        jobs = make()
        with open(out / f"{name}.jsonl", "w") as fh:
            for j in jobs:
                fh.write(json.dumps(j, separators=(",", ":")) + "\n")
        (out / f"{name}.yaml").write_text(OVERLAYS[name])
        print(f"{out / name}.jsonl: {len(jobs)} jobs over {jobs[-1]['t'] / 3600:.1f} h")


if __name__ == "__main__":
    main()
