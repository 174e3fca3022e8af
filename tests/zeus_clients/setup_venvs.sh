#!/usr/bin/env bash
# Create .venv-zeus-0.15 and .venv-zeus-0.16 at the repository root, each with one
# pinned release of the official Zeus client, for tests/test_zeus_compat.py.
# Idempotent: a venv whose marker file names the pinned version is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"

setup() {
    local dir="$ROOT/$1" version="$2" marker="$ROOT/$1/.zeus-version"
    if [[ -f "$marker" && "$(cat "$marker")" == "$version" && -x "$dir/bin/python" ]]; then
        echo "$1: zeus==$version already installed"
        return
    fi
    echo "$1: installing zeus==$version"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "zeus==$version"
    "$dir/bin/python" -c "import zeus.utils.zeusd, zeus.monitor.power_streaming" >/dev/null
    echo "$version" >"$marker"
}

setup .venv-zeus-0.15 0.15.1
setup .venv-zeus-0.16 0.16.0
