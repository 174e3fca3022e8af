"""``twist zeusd [options]`` and ``twistd zeusd [options]``: the daemon as a Twisted application plugin.

The options are :class:`zeusd.options.ServeOptions`, the same single
definition that ``zeusd serve`` and ``tac/zeusd.tac`` use, and the service is
the same tree (:func:`zeusd.service.make_daemon`).
"""

from __future__ import annotations

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from zeusd.options import ServeOptions


@implementer(IServiceMaker, IPlugin)
class ZeusdServiceMaker:
    tapname = "zeusd"
    description = "GPU and CPU power management and streaming daemon."
    options = ServeOptions

    def makeService(self, options: ServeOptions) -> IService:
        from zeusd.service import make_daemon

        return make_daemon(options.config())


serviceMaker = ZeusdServiceMaker()
