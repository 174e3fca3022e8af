# twistd -ny tac/zeusd.tac   (or without -n to daemonize; add --pidfile/--logfile)
#
# Options come from $ZEUSD_ARGS, parsed by the same ServeOptions that
# `zeusd serve` and `twist zeusd` use; without it, exactly the defaults of
# `zeusd serve` (never a simulated node). For a demo:
#   ZEUSD_ARGS="--simulate --socket-path /tmp/zeusd.sock" twistd -ny tac/zeusd.tac
import os
import shlex

from twisted.application.service import Application

from zeusd.cli import parse_serve_options
from zeusd.service import make_daemon

application = Application("zeusd")
make_daemon(parse_serve_options(shlex.split(os.environ.get("ZEUSD_ARGS", ""))).config()).setServiceParent(application)
