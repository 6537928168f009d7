#!/usr/bin/env bash
# Runner job hook: posts job-started / job-completed.
# bootstrap.sh links job-started.sh and job-completed.sh to this file, because the runner
# calls a hook script without arguments; the event comes from the name it was called by.
# A hook must never fail the job, so every error is swallowed.
set -uo pipefail

here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
event="${1:-$(basename "$0" .sh)}"
case "$event" in
  job-started | job-completed) ;;
  *)
    echo "runner-hook: unknown event '$event'" >&2
    exit 0
    ;;
esac

bash "$here/orch-event.sh" "$event" \
  "repository=${GITHUB_REPOSITORY:-}" \
  "run_id=${GITHUB_RUN_ID:-}" \
  "run_attempt=${GITHUB_RUN_ATTEMPT:-}" \
  "job=${GITHUB_JOB:-}" \
  "workflow=${GITHUB_WORKFLOW:-}" || echo "runner-hook: could not post $event" >&2
exit 0
