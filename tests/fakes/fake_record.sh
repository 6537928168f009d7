#!/usr/bin/env bash
# Stand-in for shutdown/poweroff: records the call in FAKE_TRACE and does nothing else.
set -euo pipefail
printf '%s %s\n' "$(basename "$0")" "$*" >>"${FAKE_TRACE:?FAKE_TRACE is not set}"
