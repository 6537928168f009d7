#!/usr/bin/env bash
# Posts one instance event to the orchestrator.
#   orch-event.sh EVENT [key=value ...] [key:=raw-json ...]
# key=value becomes a JSON string, key:=value is copied as raw JSON (numbers, booleans).
# Settings come from the environment or from the hook config file written by bootstrap.sh:
#   ORCH_URL, ORCH_INSTANCE_NAME, ORCH_TOKEN_FILE
# Exits 0 once the orchestrator answered 2xx, 1 otherwise; callers decide whether that matters.
set -euo pipefail

conf="${ORCH_HOOK_CONF:-${ORCH_ROOT:-}/var/lib/orchestrator/hook.env}"
if [[ -z "${ORCH_URL:-}" || -z "${ORCH_INSTANCE_NAME:-}" || -z "${ORCH_TOKEN_FILE:-}" ]] && [[ -r "$conf" ]]; then
  # shellcheck source=/dev/null
  . "$conf"
fi

log() { printf '%s orch-event: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

json_str() {
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\n'/\\n}"
  s="${s//$'\r'/\\r}"
  s="${s//$'\t'/\\t}"
  # Any other control character would make the body invalid JSON.
  printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

if [[ $# -lt 1 ]]; then
  log "usage: orch-event.sh EVENT [key=value ...]"
  exit 2
fi
event="$1"
shift

detail=""
for kv in "$@"; do
  if [[ "$kv" == *:=* ]]; then
    key="${kv%%:=*}"
    val="${kv#*:=}"
  elif [[ "$kv" == *=* ]]; then
    key="${kv%%=*}"
    val="$(json_str "${kv#*=}")"
  else
    log "ignoring malformed detail '$kv'"
    continue
  fi
  detail+="${detail:+,}$(json_str "$key"):${val}"
done
body="{\"event\":$(json_str "$event"),\"detail\":{${detail}}}"

: "${ORCH_URL:?ORCH_URL is not set}"
: "${ORCH_INSTANCE_NAME:?ORCH_INSTANCE_NAME is not set}"
url="${ORCH_URL%/}/api/v1/instances/${ORCH_INSTANCE_NAME}/events"

token=""
if [[ -n "${ORCH_TOKEN_FILE:-}" && -r "${ORCH_TOKEN_FILE}" ]]; then
  { set +x; } 2>/dev/null
  token="$(<"$ORCH_TOKEN_FILE")"
fi
if [[ -z "$token" ]]; then
  log "no event token available; not posting $event"
  exit 1
fi

attempts="${ORCH_EVENT_ATTEMPTS:-5}"
delay="${ORCH_RETRY_BASE_S:-1}"
max_delay="${ORCH_RETRY_MAX_S:-30}"
for ((i = 1; i <= attempts; i++)); do
  # The token goes through curl's stdin config so it never shows in the process list.
  code="$(printf 'header = "Authorization: Bearer %s"\n' "$token" |
    curl -sS -K - -o /dev/null -w '%{http_code}' \
      --connect-timeout 5 --max-time 15 \
      -H 'Content-Type: application/json' \
      -X POST --data-binary "$body" "$url")" || code="000"
  case "$code" in
    2??)
      log "posted $event (HTTP $code)"
      exit 0
      ;;
    408 | 429 | 5?? | 000) ;;
    *)
      log "orchestrator refused $event (HTTP $code)"
      exit 1
      ;;
  esac
  if ((i < attempts)); then
    log "posting $event failed (HTTP $code), retry $i/$attempts in ${delay}s"
    sleep "$delay"
    delay=$((delay * 2 > max_delay ? max_delay : delay * 2))
  fi
done
log "giving up on $event after $attempts attempts"
exit 1
