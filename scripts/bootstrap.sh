#!/usr/bin/env bash
# Create or reuse the project virtual environment at .venv and install unhans with everything it needs,
# from the package registries alone. Idempotent: a second run with unchanged pins installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# TorchServe's frontend is Java: it needs 11 or newer.
java_major=$( (java -version 2>&1 || true) | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
if [ -z "$java_major" ] || [ "$java_major" -lt 11 ]; then
  echo "unhans: Java 11 or newer is needed by TorchServe and was not found (java -version: '${java_major:-none}')." >&2
  echo "  install it, e.g. 'sudo apt-get install -y openjdk-17-jre-headless' (Debian/Ubuntu) or 'brew install openjdk@17' (macOS)" >&2
  exit 1
fi

# The audit report is tested in headless Chromium.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "unhans: installing chromium (Debian package) for the report tests" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null
  else
    echo "unhans: chromium is missing (the report tests need it): 'sudo apt-get install -y chromium'" >&2
  fi
fi

# The monitor's alert rules are checked with promtool and tested against a real Prometheus.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "unhans: installing prometheus (Debian package, brings promtool) for the monitor's alert tests" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "unhans: prometheus is missing (the alert tests need it and promtool): 'sudo apt-get install -y prometheus'" >&2
  fi
fi

python=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    python=$candidate; break
  fi
done
[ -n "$python" ] || { echo "unhans: Python 3.11 or newer is needed; install it (e.g. 'apt-get install python3.11 python3.11-venv')" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv

# Reinstall only when the pins or the package description changed.
stamp=.venv/.unhans-installed
wanted=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "unhans: installing into .venv (a fresh venv takes a few minutes: torch alone is several GB)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  # constraints.txt pins every dependency to a set tested together (torch 2.14.1 + torchvision 0.29.1 for zennit).
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
  echo "$wanted" > "$stamp"
fi
