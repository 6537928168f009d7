#!/usr/bin/env bash
# Stand-in for the root-only commands of the runner-user path (useradd, runuser, chown, chgrp, id),
# so that path runs unprivileged. Each call is recorded in FAKE_TRACE; runner users never exist yet.
set -euo pipefail
name="$(basename "$0")"
printf '%s %s\n' "$name" "$*" >>"${FAKE_TRACE:?FAKE_TRACE is not set}"
case "$name" in
  useradd | chown | chgrp) exit 0 ;;
  runuser)
    # runuser -u USER -- CMD...: run CMD as ourselves.
    while [[ $# -gt 0 && "$1" != "--" ]]; do shift; done
    shift
    exec "$@"
    ;;
  id)
    case "${1:-}" in
      -u)
        # Only a bare `id -u` (ourselves) exists; named users do not.
        if [[ $# -eq 1 ]]; then exec /usr/bin/id -u; fi
        exit 1
        ;;
      -gn) echo "${2:-$(/usr/bin/id -gn)}" ;;
      *) exec /usr/bin/id "$@" ;;
    esac
    ;;
  *)
    echo "fake_privileged: unknown command $name" >&2
    exit 2
    ;;
esac
