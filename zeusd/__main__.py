"""``zeusd`` and ``python -m zeusd``.

The collector is off while the command imports its modules and builds its
objects: for a daemon they live as long as the process, so collection passes
over them at start are wasted (about 40 ms of start-up). ``zeusd serve``
turns it back on once it serves, with those objects frozen out of its reach
(``ZeusdService``); the other commands right after parsing their options.
"""

from __future__ import annotations

import gc
import sys


def main() -> int:
    gc.disable()
    from zeusd.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
