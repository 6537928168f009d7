#!/usr/bin/env bash
# Boots one ephemeral GitHub Actions runner VM, in this order:
#   watchdog, runner user, runner install, GPU preflight, JIT config, hooks, spot watcher, run.
# The VM powers off whenever this script exits, whatever the reason.
#
# Settings come from bootstrap.env and bootstrap.secret (written by cloud-init). Environment
# knobs, for tests and odd images:
#   ORCH_ROOT                  prefix for /etc, /opt, /var paths (tests run in a temp dir)
#   ORCH_CONFIG, ORCH_SECRET_FILE, ORCH_STATE_DIR   override those paths one by one
#   ORCH_ORCHESTRATOR_URL      override the orchestrator URL from bootstrap.env
#   ORCH_METADATA_URL          cloud metadata base URL (spot-watch.sh)
#   ORCH_SPOT_POLL_S           spot notice poll interval, seconds (default 5)
#   ORCH_SKIP_USERADD=1        no runner user: run the runner as the current user
#   ORCH_RUNNER_USER           runner user name (default runner)
#   ORCH_RUNNER_DIR            where a downloaded runner goes (default /opt/actions-runner)
#   ORCH_RUNNER_DOWNLOAD_BASE  mirror of github.com/actions/runner/releases/download
#   ORCH_SKIP_DEPS=1           skip the runner's installdependencies.sh
#   ORCH_NVIDIA_SMI            nvidia-smi to run (default: from PATH)
#   ORCH_PREFLIGHT_ATTEMPTS, ORCH_PREFLIGHT_DELAY_S  GPU preflight tries (3) and pause (5)
#   ORCH_BOOTSTRAP_ATTEMPTS    JIT config fetch tries (8); ORCH_EVENT_ATTEMPTS: event tries (5)
#   ORCH_RETRY_BASE_S, ORCH_RETRY_MAX_S  backoff start (2) and cap (30), seconds
#   ORCH_PYTHON                python for JSON parsing (default python3, which cloud-init needs)
#   ORCH_DEBUG=1               xtrace, with secrets kept out of it
# shutdown, poweroff, curl, useradd, runuser and nvidia-smi are taken from PATH.
set -euo pipefail
shopt -s inherit_errexit
umask 022

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${ORCH_ROOT:-}"
conf_file="${ORCH_CONFIG:-$root/etc/orchestrator/bootstrap.env}"
secret_file="${ORCH_SECRET_FILE:-$root/etc/orchestrator/bootstrap.secret}"
state="${ORCH_STATE_DIR:-$root/var/lib/orchestrator}"
py="${ORCH_PYTHON:-python3}"
url_override="${ORCH_ORCHESTRATOR_URL:-}"
[[ "${ORCH_DEBUG:-0}" == 1 ]] && set -x

log() { printf '%s orchestrator-bootstrap: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# Turn xtrace off around secrets and back on only if it was on.
xtrace_was=""
secrets_begin() {
  xtrace_was="$-"
  { set +x; } 2>/dev/null
}
secrets_end() { if [[ "$xtrace_was" == *x* ]]; then set -x; fi; }

watcher_pid=""
runner_pid=""
# shellcheck disable=SC2329  # called from the EXIT trap
power_off() {
  log "powering off"
  poweroff || shutdown -h now || log "power off failed"
}
# shellcheck disable=SC2329  # the EXIT trap
on_exit() {
  local rc=$?
  trap - EXIT
  set +e
  [[ -n "$watcher_pid" ]] && kill -TERM -- "-$watcher_pid" 2>/dev/null
  [[ -n "$runner_pid" ]] && kill -INT "$runner_pid" 2>/dev/null
  log "bootstrap finished (exit $rc)"
  power_off
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# --- settings ----------------------------------------------------------------
# shellcheck source=/dev/null
. "$conf_file"
: "${ORCH_INSTANCE_NAME:?}" "${ORCH_CLOUD:?}" "${ORCH_URL:?}" "${ORCH_BOOTSTRAP_MODE:?}"
: "${ORCH_MAX_LIFETIME_S:?}" "${ORCH_EXPECTED_GPUS:?}" "${ORCH_RUNNER_VERSION:?}" "${ORCH_ARCH:?}"
ORCH_URL="${url_override:-$ORCH_URL}"
ORCH_URL="${ORCH_URL%/}"
runner_user="${ORCH_RUNNER_USER:-runner}"
skip_user="${ORCH_SKIP_USERADD:-0}"

# --- 1. watchdog: no VM outlives max_lifetime, even if everything below hangs ---
arm_watchdog() {
  # Count from the launch (the deadline), not from boot, and round down: early, never late.
  local seconds="$ORCH_MAX_LIFETIME_S"
  if [[ -n "${ORCH_DEADLINE_EPOCH:-}" ]]; then
    seconds=$((ORCH_DEADLINE_EPOCH - $(date +%s)))
  fi
  local minutes=$((seconds / 60))
  ((minutes < 1)) && minutes=1
  if shutdown -h "+$minutes" "orchestrator: max_lifetime reached" >/dev/null 2>&1; then
    log "watchdog armed: power off in $minutes min"
  else
    # No systemd/shutdown scheduling: a detached sleeper does the same job.
    log "shutdown scheduling failed; arming a sleeper watchdog ($minutes min)"
    # shellcheck disable=SC2016  # $1 expands in the child shell
    nohup bash -c 'sleep "$1"; poweroff || shutdown -h now' _ "$((minutes * 60))" >/dev/null 2>&1 &
  fi
}
arm_watchdog

mkdir -p "$state"
chmod 0755 "$state"
token_file="$state/event-token"

# Secrets live in memory from here on; the file goes at once.
secrets_begin
bootstrap_token=""
jit_config=""
if [[ -r "$secret_file" ]]; then
  # shellcheck source=/dev/null
  . "$secret_file"
  bootstrap_token="${ORCH_BOOTSTRAP_TOKEN:-}"
  jit_config="${ORCH_JIT_CONFIG:-}"
  unset ORCH_BOOTSTRAP_TOKEN ORCH_JIT_CONFIG
fi
if [[ -f "$secret_file" ]]; then
  shred -u "$secret_file" 2>/dev/null || rm -f "$secret_file"
fi
# Until the VM has its instance token, events carry the bootstrap token.
(
  umask 077
  printf '%s' "$bootstrap_token" >"$token_file"
)
secrets_end

cat >"$state/hook.env" <<EOF
ORCH_URL=$(printf '%q' "$ORCH_URL")
ORCH_INSTANCE_NAME=$(printf '%q' "$ORCH_INSTANCE_NAME")
ORCH_TOKEN_FILE=$(printf '%q' "$token_file")
EOF
chmod 0644 "$state/hook.env"
export ORCH_HOOK_CONF="$state/hook.env"
export ORCH_INSTANCE_NAME

event() { bash "$here/orch-event.sh" "$@" || log "could not post $1"; }

# --- 2. runner user ------------------------------------------------------------
if [[ "$skip_user" == 1 ]]; then
  runner_user="$(id -un)"
  log "ORCH_SKIP_USERADD=1: running the runner as $runner_user"
elif ! id -u "$runner_user" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash --user-group "$runner_user"
  log "created user $runner_user"
fi
if [[ "$skip_user" != 1 ]]; then
  # The runner user reads the token for its job hooks, nothing else here.
  chgrp "$(id -gn "$runner_user")" "$token_file"
  chmod 0640 "$token_file"
fi

# --- 3. actions runner -----------------------------------------------------------
if [[ -n "${ORCH_RUNNER_PREINSTALLED_PATH:-}" ]]; then
  runner_dir="$root$ORCH_RUNNER_PREINSTALLED_PATH"
  [[ -x "$runner_dir/run.sh" ]] || {
    log "no run.sh in preinstalled runner at $runner_dir"
    exit 1
  }
  log "using preinstalled runner at $runner_dir"
else
  runner_dir="${ORCH_RUNNER_DIR:-$root/opt/actions-runner}"
  tarball="actions-runner-linux-${ORCH_ARCH}-${ORCH_RUNNER_VERSION}.tar.gz"
  download_base="${ORCH_RUNNER_DOWNLOAD_BASE:-https://github.com/actions/runner/releases/download}"
  tmp_tar="$state/$tarball"
  log "downloading $tarball"
  curl -fsSL --retry 5 --retry-delay 2 --connect-timeout 10 --max-time 600 \
    -o "$tmp_tar" "${download_base%/}/v${ORCH_RUNNER_VERSION}/${tarball}"
  if [[ -n "${ORCH_RUNNER_SHA256:-}" ]]; then
    actual="$(sha256sum "$tmp_tar" | cut -d' ' -f1)"
    if [[ "$actual" != "${ORCH_RUNNER_SHA256,,}" ]]; then
      log "runner tarball sha256 mismatch: got $actual"
      exit 1
    fi
    log "runner tarball sha256 verified"
  else
    log "runner tarball sha256 not pinned; not verified"
  fi
  mkdir -p "$runner_dir"
  tar -xzf "$tmp_tar" -C "$runner_dir"
  rm -f "$tmp_tar"
  if [[ -x "$runner_dir/bin/installdependencies.sh" && "${ORCH_SKIP_DEPS:-0}" != 1 ]]; then
    "$runner_dir/bin/installdependencies.sh" >/dev/null || log "runner dependency install failed; continuing"
  fi
fi
if [[ "$skip_user" != 1 ]]; then
  chown -R "$runner_user:" "$runner_dir"
fi

# --- 4. GPU preflight --------------------------------------------------------------
if ((ORCH_EXPECTED_GPUS > 0)); then
  attempts="${ORCH_PREFLIGHT_ATTEMPTS:-3}"
  for ((i = 1; ; i++)); do
    # The driver can still be loading right after boot, hence a few tries.
    if result="$(bash "$here/gpu-preflight.sh" "$ORCH_EXPECTED_GPUS")"; then
      log "GPU preflight passed: $result GPU(s)"
      break
    fi
    if ((i >= attempts)); then
      found="${result%% *}"
      reason="${result#* }"
      [[ "$found" =~ ^[0-9]+$ ]] || found=0
      [[ -n "$reason" && "$reason" != "$result" ]] || reason="GPU preflight failed"
      log "GPU preflight failed: $reason"
      event preflight-failed "reason=$reason" "expected:=$ORCH_EXPECTED_GPUS" "found:=${found:-0}"
      exit 1
    fi
    sleep "${ORCH_PREFLIGHT_DELAY_S:-5}"
  done
else
  log "no GPUs expected; skipping preflight"
fi

# --- 5. JIT config -------------------------------------------------------------------
scrub_cloud_init_copies() {
  # cloud-init keeps plain copies of user-data; the secrets in them are spent by now.
  local f
  for f in "$root"/var/lib/cloud/instance/user-data.txt "$root"/var/lib/cloud/instance/user-data.txt.i; do
    [[ -f "$f" ]] && : >"$f"
  done
  return 0
}

fetch_jit_config() {
  local attempts="${ORCH_BOOTSTRAP_ATTEMPTS:-8}" delay="${ORCH_RETRY_BASE_S:-2}"
  local max_delay="${ORCH_RETRY_MAX_S:-30}" body code i
  body="$(umask 077 && mktemp "$state/bootstrap.XXXXXX")"
  for ((i = 1; i <= attempts; i++)); do
    code="$(printf 'header = "Authorization: Bearer %s"\n' "$bootstrap_token" |
      curl -sS -K - -o "$body" -w '%{http_code}' --connect-timeout 5 --max-time 30 \
        -H 'Content-Type: application/json' -X POST \
        --data-binary "{\"instance_name\":\"$ORCH_INSTANCE_NAME\"}" \
        "$ORCH_URL/api/v1/bootstrap")" || code="000"
    case "$code" in
      200) break ;;
      401 | 403)
        # Replayed or expired token: this VM can never register.
        rm -f "$body"
        log "bootstrap token rejected (HTTP $code)"
        return 1
        ;;
      408 | 429 | 5?? | 000) ;;
      *)
        rm -f "$body"
        log "bootstrap failed (HTTP $code)"
        return 1
        ;;
    esac
    if ((i >= attempts)); then
      rm -f "$body"
      log "bootstrap failed after $attempts attempts (last HTTP $code)"
      return 1
    fi
    log "bootstrap attempt $i failed (HTTP $code), retrying in ${delay}s"
    sleep "$delay"
    delay=$((delay * 2 > max_delay ? max_delay : delay * 2))
  done
  # Print the JIT config on stdout, write the instance token to its file.
  "$py" - "$body" "$token_file" <<'PY'
import json, os, sys
body, token_file = sys.argv[1], sys.argv[2]
with open(body) as f:
    doc = json.load(f)
os.unlink(body)
jit = doc.get("jit_config") or ""
if not jit:
    sys.exit("bootstrap answer has no jit_config")
token = doc.get("instance_token") or ""
if token:
    with open(token_file, "w") as f:
        f.write(token)
else:
    print("bootstrap answer has no instance_token; events keep the bootstrap token", file=sys.stderr)
sys.stdout.write(jit)
PY
}

secrets_begin
if [[ "$ORCH_BOOTSTRAP_MODE" == callback ]]; then
  if [[ -z "$bootstrap_token" ]]; then
    log "callback mode without a bootstrap token"
    exit 1
  fi
  log "fetching JIT config from $ORCH_URL"
  jit_config="$(fetch_jit_config)"
  log "JIT config received"
elif [[ -z "$jit_config" ]]; then
  log "inline mode without a JIT config"
  exit 1
fi
bootstrap_token=""
secrets_end
scrub_cloud_init_copies

# --- 6. job hooks ----------------------------------------------------------------------
hooks="$state/hooks"
mkdir -p "$hooks"
chmod 0755 "$hooks"
ln -sf "$here/runner-hook.sh" "$hooks/job-started.sh"
ln -sf "$here/runner-hook.sh" "$hooks/job-completed.sh"

# --- 7. spot watcher -----------------------------------------------------------------------
# Own process group, so stopping it also stops a metadata request in flight.
setsid bash "$here/spot-watch.sh" "$ORCH_CLOUD" &
watcher_pid=$!

# --- 8. run ----------------------------------------------------------------------------------
runner_env=(
  "ACTIONS_RUNNER_HOOK_JOB_STARTED=$hooks/job-started.sh"
  "ACTIONS_RUNNER_HOOK_JOB_COMPLETED=$hooks/job-completed.sh"
  "ORCH_HOOK_CONF=$ORCH_HOOK_CONF"
)
cd "$runner_dir"
log "starting runner $ORCH_INSTANCE_NAME as $runner_user"
secrets_begin
if [[ "$skip_user" == 1 ]]; then
  env "${runner_env[@]}" ./run.sh --jitconfig "$jit_config" &
else
  runuser -u "$runner_user" -- env "${runner_env[@]}" ./run.sh --jitconfig "$jit_config" &
fi
runner_pid=$!
jit_config=""
secrets_end
rc=0
wait "$runner_pid" || rc=$?
runner_pid=""
log "runner exited with $rc"
exit "$rc"
