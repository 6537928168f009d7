#!/usr/bin/env bash
# Stand-in for the actions runner's run.sh.
#   FAKE_RUNNER_MODE  ok: run both job hooks, exit 0 | crash: exit 1 at once
#                     | wait: job-started, then wait for FAKE_RUNNER_RELEASE to exist, job-completed
#   FAKE_RUNNER_ARGS  file that receives the arguments, one a line
#   FAKE_TRACE        optional file that records the call
set -uo pipefail

[[ -n "${FAKE_RUNNER_ARGS:-}" ]] && printf '%s\n' "$@" >"$FAKE_RUNNER_ARGS"
[[ -n "${FAKE_TRACE:-}" ]] && echo "run.sh" >>"$FAKE_TRACE"

# What the runner exports to a job, so the hooks have something to report.
export GITHUB_REPOSITORY="octo-org/octo-repo" GITHUB_RUN_ID="4242" GITHUB_RUN_ATTEMPT="1"
export GITHUB_JOB="train" GITHUB_WORKFLOW="ci"

hook() { bash -e "$1"; }

case "${FAKE_RUNNER_MODE:-ok}" in
  ok)
    hook "$ACTIONS_RUNNER_HOOK_JOB_STARTED"
    hook "$ACTIONS_RUNNER_HOOK_JOB_COMPLETED"
    exit 0
    ;;
  crash)
    echo "fake runner: crashing" >&2
    exit 1
    ;;
  wait)
    hook "$ACTIONS_RUNNER_HOOK_JOB_STARTED"
    for ((i = 0; i < 400; i++)); do
      [[ -e "${FAKE_RUNNER_RELEASE:?}" ]] && break
      sleep 0.05
    done
    hook "$ACTIONS_RUNNER_HOOK_JOB_COMPLETED"
    exit 0
    ;;
esac
echo "fake runner: unknown mode" >&2
exit 2
