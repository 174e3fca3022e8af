# twistd -ny tac/zeusd.tac
#
# Options come from $ZEUSD_ARGS, parsed by the same ServeOptions that
# `zeusd serve` and `twist zeusd` use, e.g.:
#   ZEUSD_ARGS="--simulate --socket-path /tmp/zeusd.sock" twistd -ny tac/zeusd.tac
import shlex
import os

from twisted.application.service import Application

from zeusd.options import ServeOptions
from zeusd.service import make_service

options = ServeOptions()
options.parseOptions(shlex.split(os.environ.get("ZEUSD_ARGS", "--simulate")))

application = Application("zeusd")
make_service(options.config()).setServiceParent(application)
