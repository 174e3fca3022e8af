#!/usr/bin/env bash
# `make mutation`: mutmut over the modules and tests named in pyproject's [tool.mutmut], then the score
# per module (killed or timed out, over mutants that some test ran) and the surviving mutants' names.
# A fresh run each time (the mutants/ folder is rebuilt); see docs/testing.md for the last scores.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf mutants
started=$(date +%s)
mkdir -p build
.venv/bin/mutmut run --max-children "${MUTMUT_CHILDREN:-2}" >build/mutmut-run.log 2>&1 || { tail -20 build/mutmut-run.log; exit 1; }
.venv/bin/mutmut results --all true | .venv/bin/python tests/mutation/scores.py
echo "mutation run took $(( $(date +%s) - started )) s"
