#!/usr/bin/env bash
# Stand-in for nvidia-smi that replays output captured from a real driver.
#   FAKE_NVIDIA_SMI_FIXTURES  directory with the h100-*.txt/csv captures (required)
#   FAKE_NVIDIA_SMI_MODE      ok (default, the captured single H100) | gpus=N (N copies of it)
#                             | none (no devices) | fail (driver not loaded)
#   FAKE_TRACE                optional file that records each call
set -euo pipefail

dir="${FAKE_NVIDIA_SMI_FIXTURES:?FAKE_NVIDIA_SMI_FIXTURES is not set}"
mode="${FAKE_NVIDIA_SMI_MODE:-ok}"
query="index,name,uuid,memory.total,driver_version,pci.bus_id"
[[ -n "${FAKE_TRACE:-}" ]] && printf 'nvidia-smi %s\n' "$*" >>"$FAKE_TRACE"

case "$mode" in
  none)
    echo "No devices were found"
    exit 6
    ;;
  fail)
    echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
    exit 9
    ;;
  ok) count=1 ;;
  gpus=*) count="${mode#gpus=}" ;;
  *)
    echo "fake nvidia-smi: unknown mode $mode" >&2
    exit 2
    ;;
esac

# Repeats the captured GPU with index i; the capture itself is GPU 0.
replay() {
  local file="$1" i
  for ((i = 0; i < count; i++)); do
    if ((i == 0)); then
      cat "$file"
    else
      sed -e "s/^0, /$i, /" -e "s/^GPU 0: /GPU $i: /" "$file"
    fi
  done
}

case "$*" in
  "--query-gpu=$query --format=csv,noheader") replay "$dir/h100-query-gpu.csv" ;;
  "-L") replay "$dir/h100-nvidia-smi-L.txt" ;;
  "-q") cat "$dir/h100-nvidia-smi-q.txt" ;;
  "") cat "$dir/h100-nvidia-smi.txt" ;;
  *)
    echo "fake nvidia-smi: no capture for arguments: $*" >&2
    exit 2
    ;;
esac
