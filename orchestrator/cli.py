"""The `orchestrator` command."""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.config import ConfigError, load_config


def _config_path(args) -> str:
    path = args.config or os.environ.get("ORCHESTRATOR_CONFIG")
    if not path:
        sys.exit("error: --config FILE (or ORCHESTRATOR_CONFIG) is required")
    return path


def _load(args):
    try:
        return load_config(_config_path(args))
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        sys.exit(2)


def cmd_check_config(args) -> int:
    try:
        load_config(args.file)
    except ConfigError as e:
        for line in e.errors:
            print(line)
        return 2
    print(f"{args.file}: ok")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from orchestrator.app import Orchestrator, create_app
    from orchestrator.logging import register_config_secrets, setup_logging

    setup_logging(args.log_level)
    config = _load(args)
    register_config_secrets(config)
    orch = Orchestrator(config)
    app = create_app(orch, background=True)
    listen = args.listen or config.server.listen
    host, _, port = listen.rpartition(":")
    uvicorn.run(app, host=host, port=int(port), log_config=None, access_log=False)
    return 0


def cmd_reap(args) -> int:
    from orchestrator.app import Orchestrator
    from orchestrator.logging import register_config_secrets, setup_logging

    setup_logging("WARNING")
    config = _load(args)
    register_config_secrets(config)
    orch = Orchestrator(config)
    result = orch.reaper.run_once()
    if not result.leader:
        print("another replica holds the reaper lock; nothing done")
        return 0
    for action in result.actions:
        print(action)
    for err in result.errors:
        print(f"error: {err}", file=sys.stderr)
    print(f"{len(result.actions)} action(s), {len(result.errors)} error(s)")
    return 1 if result.errors else 0


def cmd_render_cloud_init(args) -> int:
    from orchestrator.app import build_providers
    from orchestrator.core.clock import SystemClock
    from orchestrator.userdata import UserDataContext, render_user_data

    config = _load(args)
    pool = config.pool(args.pool)
    if pool is None:
        print(f"error: no pool named {args.pool!r}; pools: {', '.join(p.name for p in config.pools)}", file=sys.stderr)
        return 2
    cand = pool.candidates[args.candidate]
    try:
        providers = build_providers(config, config.server.orchestrator_id or "orch-preview", SystemClock())
        gpus = providers[cand.cloud].expected_gpus(cand) if cand.cloud in providers else (cand.gpu.count if cand.gpu else 0)
    except Exception:
        gpus = cand.gpu.count if cand.gpu else 0
    ctx = UserDataContext(
        instance_name=f"{config.server.orchestrator_id or 'orch-preview'}-{pool.name}-0000000000",
        cloud=cand.cloud,
        orchestrator_url=config.server.public_url,
        bootstrap_mode=pool.bootstrap,
        bootstrap_token="preview",
        jit_config="preview" if pool.bootstrap == "inline" else None,
        max_lifetime_s=pool.max_lifetime,
        expected_gpus=gpus,
        runner_version=pool.runner.version,
        runner_sha256=pool.runner.sha256,
        runner_preinstalled_path=pool.runner.preinstalled_path,
        arch=cand.arch,
    )
    sys.stdout.write(render_user_data(ctx, redact=True))
    return 0


def cmd_demo(args) -> int:
    from orchestrator.demo import run_demo

    return run_demo(duration_s=args.duration, jobs=args.jobs, db=args.db)


def cmd_schema(args) -> int:
    from orchestrator.config import schema_text

    sys.stdout.write(schema_text())
    return 0


def cmd_simulate(args) -> int:
    from orchestrator.sim.simulate import main as simulate_main

    return simulate_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrator", description="Self-hosted GitHub Actions runner orchestrator for spot GPU VMs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="webhook intake, admin API, VM-facing API and the reaper in one process")
    s.add_argument("--config")
    s.add_argument("--listen", help="HOST:PORT (default: server.listen)")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("check-config", help="validate a config file: exit 0, or exit 2 with FILE:LINE: message lines")
    s.add_argument("file")
    s.set_defaults(fn=cmd_check_config)

    s = sub.add_parser("render-cloud-init", help="print the user-data a VM of a pool boots with (secrets redacted)")
    s.add_argument("--config")
    s.add_argument("--pool", required=True)
    s.add_argument("--candidate", type=int, default=0, help="index in the pool's candidate list (default 0)")
    s.set_defaults(fn=cmd_render_cloud_init)

    s = sub.add_parser("reap", help="run the reaper")
    s.add_argument("--config")
    s.add_argument("--once", action="store_true", required=True, help="one reconcile pass; prints every action")
    s.set_defaults(fn=cmd_reap)

    s = sub.add_parser("demo", help="the whole system on a sandbox cloud and a simulated GitHub, no credentials")
    s.add_argument("--duration", type=float, default=60.0, help="seconds before the demo stops (default 60)")
    s.add_argument("--jobs", type=int, default=8, help="scripted jobs to feed (default 8)")
    s.add_argument("--db", default=None, help="SQLite file (default: a temporary one)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("simulate", help="replay a job trace through the real scheduling code in simulated time")
    s.add_argument("--config")
    s.add_argument("--trace", required=True)
    s.add_argument("--report", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overlay", help="simulator options YAML (default: the trace's .yaml beside it, if any)")
    s.add_argument("--format", choices=["json", "table"], default="json")
    s.set_defaults(fn=cmd_simulate)

    s = sub.add_parser("schema", help="print the JSON Schema of the config format")
    s.set_defaults(fn=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
