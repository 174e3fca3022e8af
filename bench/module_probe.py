"""Run ``zeusd`` unchanged; on SIGUSR1 write every name in ``sys.modules`` to ``$ZEUSD_BENCH_MODULES_OUT``.

    ZEUSD_BENCH_MODULES_OUT=FILE python [-X importtime] bench/module_probe.py serve ...

bench/compare.py sends the signal once the daemon has answered its first
requests, to learn what a running daemon has imported, without a debug switch
in the daemon. One name per line, in import order. This wrapper itself imports
only what ``python -m zeusd`` loads anyway (os, signal, sys, runpy).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from types import FrameType

ENV_OUT = "ZEUSD_BENCH_MODULES_OUT"


def dump(signum: int, frame: FrameType | None) -> None:
    path = os.environ[ENV_OUT]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(sys.modules) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["zeusd", *sys.argv[1:]]
    runpy.run_module("zeusd", run_name="__main__", alter_sys=True)
