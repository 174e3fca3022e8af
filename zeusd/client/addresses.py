"""Where a daemon listens, and the Twisted agent that reaches it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from twisted.internet import ssl
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from zeusd.constants import DEFAULT_SOCKET_PATH


@dataclass(frozen=True)
class ServerAddress:
    """Where a daemon listens: a UNIX socket path, or a host and port over HTTP(S)."""

    scheme: Literal["unix", "http", "https"]
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> "ServerAddress":
        """``unix:PATH``, an absolute path, ``HOST:PORT``, ``[V6]:PORT``, ``http(s)://HOST:PORT``."""
        text = text.strip()
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if path.startswith("//"):  # unix:///run/zeusd.sock
                path = path[2:]
            if not path:
                raise ValueError("unix: needs a socket path, e.g. unix:/var/run/zeusd.sock")
            return cls("unix", path=path)
        if text.startswith("/"):
            return cls("unix", path=text)
        scheme: Literal["http", "https"] = "http"
        for prefix in ("http://", "https://"):
            if text.startswith(prefix):
                scheme = "https" if prefix == "https://" else "http"
                text = text[len(prefix) :].rstrip("/")
                break
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"{text!r} is not [IPv6]:PORT")
            port_text = rest[1:]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or ":" in host:
                raise ValueError(f"{text!r} is not unix:PATH, HOST:PORT or https://HOST:PORT")
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"bad port in {text!r}")
        return cls(scheme, host=host, port=int(port_text))

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def label(self) -> str:
        """How the server is named in readings and output."""
        if self.scheme == "unix":
            return f"unix:{self.path}"
        return f"https://{self.netloc}" if self.scheme == "https" else self.netloc

    def url(self, path: str) -> str:
        if self.scheme == "unix":
            return f"http://localhost{path}"  # the Host header the official client sends
        return f"{self.scheme}://{self.netloc}{path}"

    def __str__(self) -> str:
        return self.label


def default_server(environ: Mapping[str, str] | None = None) -> ServerAddress:
    """Like ``ZeusdConfig.from_env()``: ``$ZEUSD_SOCK_PATH`` wins, then ``$ZEUSD_HOST_PORT``, else the default socket."""
    env = os.environ if environ is None else environ
    if env.get("ZEUSD_SOCK_PATH"):
        return ServerAddress("unix", path=env["ZEUSD_SOCK_PATH"])
    if env.get("ZEUSD_HOST_PORT"):
        return ServerAddress.parse(env["ZEUSD_HOST_PORT"])
    return ServerAddress("unix", path=DEFAULT_SOCKET_PATH)


def as_address(server: ServerAddress | str | None) -> ServerAddress:
    """An address from what a caller passed: an address, its text, or None for the default."""
    if server is None:
        return default_server()
    return server if isinstance(server, ServerAddress) else ServerAddress.parse(server)


@implementer(IAgentEndpointFactory)
class _UnixEndpointFactory:
    """Every URI goes to the one UNIX socket (the URL's host is only the Host header)."""

    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=int(max(1, self._timeout)))


@implementer(IPolicyForHTTPS)
class _TrustRootPolicy:
    """HTTPS verified against the given CA certificates instead of the system store."""

    def __init__(self, ca_file: str) -> None:
        try:
            with open(ca_file, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ValueError(f"--ca-file {ca_file}: {e.strerror}") from None
        marker = b"-----END CERTIFICATE-----"
        blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
        if not blocks:
            raise ValueError(f"--ca-file {ca_file}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)")
        self._trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=self._trust)


def agent_for(
    server: ServerAddress, reactor: Any, pool: HTTPConnectionPool, timeout_s: float, ca_file: str | None = None
) -> IAgent:
    """The agent that reaches ``server``: its UNIX socket, or TCP with TLS verified by ``ca_file`` or the system."""
    if server.scheme == "unix":
        agent: IAgent = Agent.usingEndpointFactory(reactor, _UnixEndpointFactory(reactor, server.path, timeout_s), pool=pool)
        return agent
    if server.scheme == "https" and ca_file is not None:
        return Agent(reactor, contextFactory=_TrustRootPolicy(ca_file), connectTimeout=timeout_s, pool=pool)
    return Agent(reactor, connectTimeout=timeout_s, pool=pool)


__all__ = ["ServerAddress", "agent_for", "as_address", "default_server"]
