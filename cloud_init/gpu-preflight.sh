#!/usr/bin/env bash
# Counts the GPUs the NVIDIA driver sees.
#   gpu-preflight.sh EXPECTED     exit 0 and print the count when at least EXPECTED GPUs are present;
#                                 otherwise exit 1 and print "COUNT REASON"
#   gpu-preflight.sh --parse-csv  count GPUs in `nvidia-smi --query-gpu=... --format=csv,noheader` on stdin
#   gpu-preflight.sh --parse-list count GPUs in `nvidia-smi -L` output on stdin
set -euo pipefail

QUERY="index,name,uuid,memory.total,driver_version,pci.bus_id"

# One GPU per line: "0, NVIDIA H100 80GB HBM3, GPU-..., 81559 MiB, 580.159.04, 00000000:00:06.0".
# Lines that do not start with an index (driver errors, blank lines) are not GPUs.
parse_csv() {
  awk -F',' 'NF >= 6 && $1 ~ /^[[:space:]]*[0-9]+[[:space:]]*$/ { n++ } END { print n + 0 }'
}

# "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)"; indented MIG lines are slices, not GPUs.
parse_list() {
  awk '/^GPU [0-9]+: .*\(UUID: GPU-/ { n++ } END { print n + 0 }'
}

first_line() { head -n 1 | tr -d '\r' | cut -c1-200; }

case "${1:-}" in
  --parse-csv)
    parse_csv
    exit 0
    ;;
  --parse-list)
    parse_list
    exit 0
    ;;
  '' | *[!0-9]*)
    echo "usage: gpu-preflight.sh EXPECTED | --parse-csv | --parse-list" >&2
    exit 2
    ;;
esac
expected="$1"

smi="${ORCH_NVIDIA_SMI:-nvidia-smi}"
if ! command -v "$smi" >/dev/null 2>&1; then
  echo "0 nvidia-smi not found"
  exit 1
fi

out=""
rc=0
out="$("$smi" --query-gpu="$QUERY" --format=csv,noheader 2>&1)" || rc=$?
if ((rc == 0)); then
  found="$(printf '%s\n' "$out" | parse_csv)"
else
  # Older drivers or a partly broken query: fall back to the device list.
  list_rc=0
  list="$("$smi" -L 2>&1)" || list_rc=$?
  if ((list_rc != 0)); then
    echo "0 nvidia-smi failed (exit $rc): $(printf '%s\n' "$out" | first_line)"
    exit 1
  fi
  found="$(printf '%s\n' "$list" | parse_list)"
fi

if ((found < expected)); then
  echo "$found expected $expected GPUs, nvidia-smi lists $found"
  exit 1
fi
echo "$found"
