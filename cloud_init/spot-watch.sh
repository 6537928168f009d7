#!/usr/bin/env bash
# Polls the cloud's metadata service for a spot/preemption notice and posts
# `spot-interruption` once, then exits.
#   spot-watch.sh aws|gcp|azure|sandbox
# ORCH_METADATA_URL overrides the metadata base URL, ORCH_SPOT_POLL_S the poll interval.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cloud="${1:-${ORCH_CLOUD:-}}"
poll="${ORCH_SPOT_POLL_S:-5}"
py="${ORCH_PYTHON:-python3}"

log() { printf '%s spot-watch: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

case "$cloud" in
  gcp) base="${ORCH_METADATA_URL:-http://metadata.google.internal}" ;;
  aws | azure) base="${ORCH_METADATA_URL:-http://169.254.169.254}" ;;
  *)
    log "no spot notices to watch on cloud '$cloud'"
    exit 0
    ;;
esac
base="${base%/}"

mcurl() { curl -sS --connect-timeout 2 --max-time 5 "$@"; }

# Each check prints detail arguments for orch-event.sh and succeeds when a notice is out.
check_aws() {
  local token code body
  # IMDSv2 first; an empty token falls back to IMDSv1 where that is still allowed.
  token="$(mcurl -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$base/latest/api/token" 2>/dev/null)" || token=""
  body="$(mktemp)"
  if [[ -n "$token" ]]; then
    code="$(mcurl -o "$body" -w '%{http_code}' -H "X-aws-ec2-metadata-token: $token" \
      "$base/latest/meta-data/spot/instance-action" 2>/dev/null)" || code="000"
  else
    code="$(mcurl -o "$body" -w '%{http_code}' "$base/latest/meta-data/spot/instance-action" 2>/dev/null)" || code="000"
  fi
  if [[ "$code" == "200" ]]; then
    echo "cloud=aws"
    echo "notice=$(tr -d '\n' <"$body" | cut -c1-500)"
    rm -f "$body"
    return 0
  fi
  rm -f "$body"
  return 1
}

check_gcp() {
  local value
  value="$(mcurl -H 'Metadata-Flavor: Google' "$base/computeMetadata/v1/instance/preempted" 2>/dev/null)" || return 1
  if [[ "$(printf '%s' "$value" | tr -d '[:space:]')" == "TRUE" ]]; then
    echo "cloud=gcp"
    echo "notice=preempted"
    return 0
  fi
  return 1
}

check_azure() {
  local doc
  doc="$(mcurl -H 'Metadata: true' "$base/metadata/scheduledevents?api-version=2020-07-01" 2>/dev/null)" || return 1
  # Scheduled events can list other VMs of the same availability set; only ours counts.
  printf '%s' "$doc" | ORCH_VM="${ORCH_INSTANCE_NAME:-}" "$py" -c '
import json, os, sys
try:
    doc = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
me = os.environ.get("ORCH_VM", "")
for ev in doc.get("Events") or []:
    res = ev.get("Resources") or []
    if ev.get("EventType") == "Preempt" and (not res or not me or me in res):
        print("cloud=azure")
        print("event_id=%s" % ev.get("EventId", ""))
        print("not_before=%s" % ev.get("NotBefore", ""))
        sys.exit(0)
sys.exit(1)
'
}

log "watching $cloud spot notices at $base every ${poll}s"
while :; do
  if detail="$("check_$cloud")"; then
    args=()
    while IFS= read -r line; do
      [[ -n "$line" ]] && args+=("$line")
    done <<<"$detail"
    log "spot interruption notice received"
    bash "$here/orch-event.sh" spot-interruption "${args[@]}" || log "could not post spot-interruption"
    exit 0
  fi
  sleep "$poll"
done
