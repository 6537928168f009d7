"""Runs every benchmark and writes bench/results.json and bench/chart.png.

    python bench/run_all.py [--quick] [--jobs 2] [--skip-benches]

- bench/webhook_ingest.py and bench/reaper_scale.py (subprocesses; their JSON is
  kept as is, or "missing" / "failed" when they are absent or break);
- every bench/traces/*.jsonl through `orchestrator simulate` (with the trace's
  .yaml overlay), plus bursty with API latency set to zero, which separates the
  scaling policy from the time our calls take.

Prints a markdown summary for the README. Targets are read from the reports,
never asserted here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
POLICIES = ["ours", "cml", "cml-spot", "tf-aws", "ideal"]
COLORS = {"ours": "#1f77b4", "cml": "#ff7f0e", "cml-spot": "#ffbb78", "tf-aws": "#2ca02c", "ideal": "#7f7f7f"}


def run_bench(script: str, args: list[str], timeout: float) -> dict:
    path = HERE / script
    if not path.exists():
        return {"status": "missing"}
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f}s"}
    wall = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        return {"status": "failed", "rc": proc.returncode, "wall_s": wall, "stderr_tail": proc.stderr[-2000:]}
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        # The JSON object may follow progress lines.
        start = proc.stdout.find("{")
        try:
            result = json.loads(proc.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            result = None
    if result is None:
        return {"status": "failed", "reason": "no JSON on stdout", "wall_s": wall, "stdout_tail": proc.stdout[-2000:]}
    return {"status": "ok", "wall_s": wall, "result": result}


def run_trace(name: str, trace: Path, config: Path, seed: int, overlay: Path | None, tmp: Path) -> dict:
    report = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "orchestrator.sim.simulate", "--config", str(config), "--trace", str(trace),
           "--report", str(report), "--seed", str(seed)]
    if overlay is not None:
        cmd += ["--overlay", str(overlay)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        return {"status": "failed", "rc": proc.returncode, "stderr_tail": proc.stderr[-2000:], "wall_s": wall}
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    cpu = re.search(r"([\d.]+)s cpu", last)
    return {"status": "ok", "wall_s": wall, "cpu_s": float(cpu.group(1)) if cpu else None, "log": last,
            "report": json.loads(report.read_text())}


def zero_latency_overlay(trace: Path, tmp: Path) -> Path:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    src = trace.with_suffix(".yaml")
    data = (yaml.load(src.read_text()) if src.exists() else None) or {}
    sim = dict(data.get("simulator") or {})
    sim.update(github_api_latency_s=0.0, cloud_api_latency_s=0.0)
    data["simulator"] = sim
    out = tmp / f"{trace.stem}-no-latency.yaml"
    with open(out, "w") as fh:
        yaml.dump(data, fh)
    return out


def figures_of(report: dict) -> dict[str, dict]:
    out = {"ours": report}
    out.update(report.get("baselines", {}))
    return out


def chart(traces: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, t in traces.items() if t["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(POLICIES)
    for ax, (title, get, unit) in zip(axes, [
        ("cost", lambda f: f["cost_usd"], "USD"),
        ("p95 wait (queued -> job started)", lambda f: f["wait_s"]["p95"], "seconds"),
    ]):
        for k, policy in enumerate(POLICIES):
            xs, ys = [], []
            for i, name in enumerate(names):
                fig_ = figures_of(traces[name]["report"]).get(policy)
                if fig_ is not None and get(fig_) is not None:
                    xs.append(i + (k - (len(POLICIES) - 1) / 2) * width)
                    ys.append(get(fig_))
            ax.bar(xs, ys, width, label=policy, color=COLORS[policy])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("orchestrator (ours) against baseline policies, same traces and world model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(results: dict) -> str:
    traces = {n: t for n, t in results["traces"].items() if t["status"] == "ok"}
    lines = ["| trace | jobs | lost | leaked | dup VMs | overshoot $ | decision p50 / p99 ms | billed ÷ (job+boot) | idle ÷ billed | sim cpu s (wall) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in traces.items():
        r = t["report"]
        share = r["idle_vm_s"] / r["billed_vm_s"] if r["billed_vm_s"] else 0.0
        lines.append(
            f"| {name} | {r['jobs']} | {r['lost_jobs']} | {r['leaked_vms']} | {r['duplicate_vms']} | {fmt(r['budget_overshoot_usd'])} "
            f"| {fmt(r['decision_delay_ms']['p50'], 0)} / {fmt(r['decision_delay_ms']['p99'], 0)} "
            f"| {fmt(r['billed_over_job_plus_boot'], 3)} | {share:.2%} | {fmt(t.get('cpu_s'), 0)} ({fmt(t['wall_s'], 0)}) |"
        )
    lines += ["", "| trace | cost $ ours | CML-style (on demand) | CML-style (spot) | tf-aws-style | ideal "
              "| p95 wait s ours | CML-style (on demand) | CML-style (spot) | tf-aws-style | ideal |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in traces.items():
        f = figures_of(t["report"])
        cost = " | ".join(fmt(f[p]["cost_usd"]) if p in f else "-" for p in POLICIES)
        wait = " | ".join(fmt(f[p]["wait_s"]["p95"], 1) if p in f else "-" for p in POLICIES)
        lines.append(f"| {name} | {cost} | {wait} |")
    if traces:
        names = list(next(iter(traces.values()))["report"]["targets"])
        lines += ["", "| trace | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for name, t in traces.items():
            tg = t["report"]["targets"]
            cells = [("✅ " if tg[k]["met"] else "❌ ") + fmt(tg[k]["value"], 3) if k in tg else "-" for k in names]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    benches = results["benches"]
    lines += ["", "Other benchmarks: " + ", ".join(f"{k}: {v['status']}" for k, v in benches.items())]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "simulate.yaml"))
    p.add_argument("--traces", default=str(HERE / "traces"))
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--chart", default=str(HERE / "chart.png"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="traces simulated at once (default 2: the cores we have)")
    p.add_argument("--skip-benches", action="store_true", help="only the traces")
    p.add_argument("--quick", action="store_true", help="quick modes of the other benchmarks")
    args = p.parse_args()

    results: dict = {
        "generated_by": "bench/run_all.py",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "config": os.path.relpath(args.config, ROOT),
        "seed": args.seed,
        "benches": {},
        "traces": {},
    }
    if args.skip_benches:
        results["benches"] = {"webhook_ingest": {"status": "skipped"}, "reaper_scale": {"status": "skipped"}}
    else:
        results["benches"]["webhook_ingest"] = run_bench("webhook_ingest.py", ["--quick"] if args.quick else [], 1800)
        print(f"webhook_ingest: {results['benches']['webhook_ingest']['status']}", file=sys.stderr)
        results["benches"]["reaper_scale"] = run_bench("reaper_scale.py", ["--sizes", "100,1000", "--aws-sizes", ""] if args.quick else [], 3600)
        print(f"reaper_scale: {results['benches']['reaper_scale']['status']}", file=sys.stderr)

    traces = sorted(Path(args.traces).glob("*.jsonl"))
    with tempfile.TemporaryDirectory(prefix="run-all-") as tmpdir:
        tmp = Path(tmpdir)
        work = [(t.stem, t, None) for t in traces]
        bursty = Path(args.traces) / "bursty.jsonl"
        if bursty.exists():
            work.append(("bursty-no-api-latency", bursty, zero_latency_overlay(bursty, tmp)))

        def one(item):
            name, trace, overlay = item
            out = run_trace(name, trace, Path(args.config), args.seed, overlay, tmp)
            print(f"{name}: {out['status']} in {out['wall_s']}s", file=sys.stderr)
            return name, out

        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            for name, out in pool.map(one, work):
                results["traces"][name] = out

    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    chart(results["traces"], Path(args.chart))
    print(markdown(results))
    return 0 if all(t["status"] == "ok" for t in results["traces"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
