#!/usr/bin/env bash
# Debian packages that some tests drive for real: Prometheus (tests/test_prometheus.py)
# and Chromium (tests/test_live_page.py). Installed with apt-get when missing, when
# running as root on a machine with apt; otherwise this says why not and those tests
# skip, naming the missing program. Never fails the build: a missing package is a skip.
set -uo pipefail

# Each package installs a program of its own name, which is what the tests look for.
PACKAGES=(prometheus chromium)

missing=()
for package in "${PACKAGES[@]}"; do
    if command -v "$package" >/dev/null 2>&1; then
        echo "setup_system_packages: $package present"
    else
        missing+=("$package")
    fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ "$(id -u)" -ne 0 ]]; then
    echo "setup_system_packages: not root, not installing ${missing[*]}; the tests that need them will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_system_packages: no apt-get, not installing ${missing[*]}; the tests that need them will skip"
    exit 0
fi

echo "setup_system_packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# An install from stale package lists can fail on a removed version: refresh first.
if ! apt-get update -qq; then
    echo "setup_system_packages: apt-get update failed; the tests that need ${missing[*]} will skip"
    exit 0
fi
for package in "${missing[@]}"; do
    if ! apt-get install -y -qq --no-install-recommends "$package" >/dev/null; then
        echo "setup_system_packages: apt-get install $package failed; the tests that need it will skip"
    fi
done
exit 0
