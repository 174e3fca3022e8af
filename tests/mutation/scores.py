"""Mutation score per module from ``mutmut results --all true`` (on stdin); survivors listed after."""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

KILLED = {"killed", "timeout", "caught by type check"}
LINE = re.compile(r"^\s*(?P<module>[\w.]+?)\.x[_\u01c1].*?__mutmut_\d+: (?P<status>.+)$")


def main() -> int:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    for line in sys.stdin:
        match = LINE.match(line.rstrip("\n"))
        if match is None:
            continue
        module, status = match["module"], match["status"]
        counts[module][status] += 1
        if status == "survived":
            survivors.append(line.strip().rsplit(":", 1)[0])
    if not counts:
        print("no mutants found: did mutmut run?", file=sys.stderr)
        return 1
    print(f"{'module':40} {'killed':>7} {'tested':>7} {'score':>7}  no tests")
    for module in sorted(counts):
        c = counts[module]
        killed = sum(c[s] for s in KILLED)
        tested = killed + c["survived"]
        score = 100 * killed / tested if tested else 0.0
        print(f"{module:40} {killed:7} {tested:7} {score:6.1f}%  {c['no tests']}")
    print(f"\n{len(survivors)} surviving mutants (mutmut show NAME for the diff):")
    for name in survivors:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
