"""Where the daemon listens: endpoint descriptions, and one service per listener.

A listener is given as a Twisted endpoint description (``--listen``, repeatable):

* ``unix:PATH[:mode=660][:backlog=N]``: a UNIX socket (mode default 666);
* ``tcp:PORT[:interface=ADDR][:backlog=N]`` (interface default 127.0.0.1; IPv6 with escaped colons);
* ``ssl:PORT:privateKey=KEY.pem[:certKey=CERT.pem][:interface=ADDR][:backlog=N]``: HTTPS, TLS 1.2+;
* ``systemd:domain=UNIX|INET|INET6:index=N`` (or ``name=NAME``): a socket passed by systemd.

The keys are Twisted's; zeusd builds the endpoints itself so that every UNIX
socket gets the stale-socket check and a private umask, and every TLS key the
privacy check. :class:`ListenerService` binds in ``privilegedStartService`` (as
root, after ``twistd`` forked) and stops listening first at shutdown.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, Literal

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from zeusd.errors import StartupError
from zeusd.lifecycle import OpenedAtStart
from zeusd.systemd import inherited_sockets

log = Logger()

BACKLOG = 128
_DOMAINS = {"UNIX": socket.AF_UNIX, "INET": socket.AF_INET, "INET6": socket.AF_INET6}


class ListenSyntaxError(ValueError):
    """A description that is not a listener zeusd can serve (a usage error)."""


@dataclass(frozen=True)
class ListenerSpec:
    """One listening endpoint, validated but not yet opened."""

    kind: Literal["unix", "tcp", "ssl", "systemd"]
    path: str | None = None  # unix
    mode: int = 0o666  # unix
    host: str = "127.0.0.1"  # tcp, ssl
    port: int = 0  # tcp, ssl
    tls_key: str | None = None  # ssl
    tls_cert: str | None = None  # ssl
    domain: str = "UNIX"  # systemd
    index: int | None = None  # systemd
    name: str | None = None  # systemd
    backlog: int = BACKLOG

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path} (mode {self.mode:04o})"
        if self.kind in ("tcp", "ssl"):
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{'https' if self.kind == 'ssl' else 'http'}://{host}:{self.port}"
        which = f"index {self.index}" if self.index is not None else f"name {self.name!r}"
        return f"systemd socket {which} ({self.domain})"

    @property
    def is_network(self) -> bool:
        """Whether clients may reach it from other hosts (tokens cross the network)."""
        return self.kind in ("tcp", "ssl") or (self.kind == "systemd" and self.domain != "UNIX")

    @property
    def is_plain_network(self) -> bool:
        return self.kind == "tcp" or (self.kind == "systemd" and self.domain != "UNIX")


# Parsing ------------------------------------------------------------------------


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint grammar: ``:`` separates, ``key=value`` names, ``\\`` escapes."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    field: list[str] = []
    current = ""
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current += next(chars, "")
        elif char == "=" and not field:
            field.append(current)
            current = ""
        elif char == ":":
            _store(field, current, args, kwargs)
            field, current = [], ""
        else:
            current += char
    _store(field, current, args, kwargs)
    return args, kwargs


def _store(field: list[str], current: str, args: list[str], kwargs: dict[str, str]) -> None:
    if field:
        if field[0] in kwargs:
            raise ListenSyntaxError(f"'{field[0]}' is given twice")
        kwargs[field[0]] = current
    else:
        args.append(current)


def parse_listen(description: str) -> ListenerSpec:
    """A ``--listen`` value → ListenerSpec; raises ListenSyntaxError naming what is wrong."""
    args, kwargs = split_description(description)
    kind, positional = args[0], args[1:]
    if kind == "unix":
        _expect(kind, positional, kwargs, 1, {"mode", "backlog"})
        if not positional[0]:
            raise ListenSyntaxError("unix: needs a socket path")
        return ListenerSpec("unix", path=positional[0], mode=parse_mode(kwargs.get("mode", "666")), backlog=_backlog(kwargs))
    if kind == "tcp":
        _expect(kind, positional, kwargs, 1, {"interface", "backlog"})
        return ListenerSpec("tcp", host=_interface(kwargs), port=parse_port(positional[0]), backlog=_backlog(kwargs))
    if kind == "ssl":
        _expect(kind, positional, kwargs, 1, {"interface", "backlog", "privateKey", "certKey"})
        if "privateKey" not in kwargs:
            raise ListenSyntaxError("ssl: needs privateKey=KEY.pem (and certKey=CERT.pem unless the key file holds both)")
        key = kwargs["privateKey"]
        return ListenerSpec(
            "ssl", host=_interface(kwargs), port=parse_port(positional[0]), tls_key=key,
            tls_cert=kwargs.get("certKey", key), backlog=_backlog(kwargs),
        )
    if kind == "systemd":
        _expect(kind, positional, kwargs, 0, {"domain", "index", "name"})
        domain = kwargs.get("domain", "")
        if domain not in _DOMAINS:
            raise ListenSyntaxError(f"systemd: domain must be one of {', '.join(_DOMAINS)}, got {domain!r}")
        if ("index" in kwargs) == ("name" in kwargs):
            raise ListenSyntaxError("systemd: give exactly one of index=N or name=NAME")
        index = kwargs.get("index")
        if index is not None and not (index.isascii() and index.isdigit()):
            raise ListenSyntaxError(f"systemd: index must be a number, got {index!r}")
        return ListenerSpec("systemd", domain=domain, index=None if index is None else int(index), name=kwargs.get("name"))
    raise ListenSyntaxError(f"unknown listener kind {kind!r}: use unix:, tcp:, ssl: or systemd:")


def _expect(kind: str, positional: list[str], kwargs: dict[str, str], count: int, keys: set[str]) -> None:
    if len(positional) != count:
        raise ListenSyntaxError(f"{kind}: expected {count} positional value(s), got {len(positional)}")
    unknown = sorted(set(kwargs) - keys)
    if unknown:
        raise ListenSyntaxError(f"{kind}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(keys))}")


def _backlog(kwargs: dict[str, str]) -> int:
    value = kwargs.get("backlog", str(BACKLOG))
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise ListenSyntaxError(f"backlog must be 1..65535, got {value!r}")
    return int(value)


def _interface(kwargs: dict[str, str]) -> str:
    host = kwargs.get("interface", "127.0.0.1")
    try:
        return str(ip_address(host))
    except ValueError:
        raise ListenSyntaxError(f"interface must be an IP address, got {host!r}") from None


def parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise ListenSyntaxError(f"bad port {text!r}")
    return int(text)


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ListenSyntaxError(f"{text!r} is not an octal mode such as 666 or 0660") from None
    if not 0 <= mode <= 0o777:
        raise ListenSyntaxError(f"mode {text!r} is outside 000..777")
    return mode


def inherited_listeners() -> list[ListenerSpec]:
    """One listener per socket systemd passed to this process (none outside socket activation)."""
    specs = []
    for index, inherited in enumerate(inherited_sockets()):
        try:
            probe = socket.socket(fileno=inherited.fd)
        except OSError as e:
            raise StartupError(f"systemd passed file descriptor {inherited.fd}, which is not a socket: {e.strerror}") from None
        try:
            family = probe.family
        finally:
            probe.detach()  # the descriptor stays open for the listener
        domain = {socket.AF_UNIX: "UNIX", socket.AF_INET: "INET", socket.AF_INET6: "INET6"}.get(family)
        if domain is None:
            raise StartupError(f"systemd passed a socket of an unsupported family ({family!r})")
        specs.append(ListenerSpec("systemd", domain=domain, index=index))
    return specs


# Starting -------------------------------------------------------------------------


def prepare_socket_path(path: str) -> None:
    """Make ``path`` free for a new socket without ever harming something else.

    A dead socket (a crashed daemon's) is removed; a live one, or anything
    that is not a socket, is refused. With ``remove=False`` (a preflight) the
    dead socket is only checked.
    """
    _check_socket_path(path, remove=True)


def _check_socket_path(path: str, remove: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if remove and not os.path.isdir(parent):
            os.makedirs(parent, mode=0o755, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it. Remove it or pick another socket path.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        if remove:
            log.info("Removing stale socket {path} left by a previous run", path=path)
            os.unlink(path)
        return
    except OSError as e:
        raise StartupError(f"Cannot tell whether {path} is in use ({e}); refusing to replace it.") from None
    finally:
        probe.close()
    raise StartupError(f"Another process is already serving on {path}; refusing to take over its socket.")


def tls_options(cert_path: str, key_path: str) -> Any:
    """Server TLS settings from PEM files; TLS 1.2+ and Twisted's default ciphers."""
    from twisted.internet import ssl

    try:
        key_mode = stat.S_IMODE(os.stat(key_path).st_mode)
    except OSError as e:
        raise StartupError(f"Cannot read TLS key file '{key_path}': {e.strerror}") from None
    if key_mode & 0o077:
        raise StartupError(
            f"TLS key file '{key_path}' is accessible by other users (mode {key_mode:04o}); run: chmod 600 {key_path}"
        )
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
        certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(pem) for pem in _extra_certificates(cert_pem)]
    except Exception as e:  # OpenSSL reports bad PEM in many ways
        raise StartupError(f"Cannot load TLS certificate '{cert_path}' with key '{key_path}': {e}") from None
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=[c.original for c in chain],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _extra_certificates(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
    return blocks[1:]


def check_listener(spec: ListenerSpec) -> None:
    """Everything that would stop this listener from starting, found without starting it.

    Runs before ``twistd`` forks (so errors reach the terminal): a live or
    foreign socket file, a port already taken, an unusable TLS pair.
    """
    if spec.kind == "unix":
        assert spec.path is not None
        _check_socket_path(spec.path, remove=False)
    elif spec.kind in ("tcp", "ssl"):
        if spec.kind == "ssl":
            assert spec.tls_cert is not None and spec.tls_key is not None
            tls_options(spec.tls_cert, spec.tls_key)
        if spec.port:
            _check_port_free(spec.host, spec.port)
    else:
        _systemd_descriptor(spec)


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise StartupError(f"Cannot listen on {host}:{port}: {e.strerror}") from None


def _systemd_descriptor(spec: ListenerSpec) -> int:
    inherited = inherited_sockets()
    if spec.index is not None:
        if spec.index >= len(inherited):
            raise StartupError(f"{spec}: systemd passed {len(inherited)} socket(s) to this process")
        return inherited[spec.index].fd
    named = {s.name: s.fd for s in inherited}
    if spec.name not in named:
        raise StartupError(f"{spec}: systemd passed no socket of that name (names: {', '.join(named) or 'none'})")
    return named[spec.name]


def endpoint_for(reactor: Any, spec: ListenerSpec) -> IStreamServerEndpoint:
    if spec.kind == "unix":
        assert spec.path is not None
        return UNIXServerEndpoint(reactor, spec.path, backlog=spec.backlog, mode=spec.mode)
    if spec.kind == "ssl":
        assert spec.tls_cert is not None and spec.tls_key is not None
        options = tls_options(spec.tls_cert, spec.tls_key)
        return SSL4ServerEndpoint(reactor, spec.port, options, backlog=spec.backlog, interface=spec.host)
    if spec.kind == "tcp":
        endpoint_type = TCP6ServerEndpoint if ":" in spec.host else TCP4ServerEndpoint
        return endpoint_type(reactor, spec.port, backlog=spec.backlog, interface=spec.host)
    return AdoptedStreamServerEndpoint(reactor, _systemd_descriptor(spec), _DOMAINS[spec.domain])


class ListenerService(OpenedAtStart):
    """One listening socket, bound at (privileged) start and closed first at stop.

    UNIX sockets are bound under a umask that leaves them private until their
    mode is set, then given their owner. A UNIX socket systemd passed keeps the
    mode and the file systemd gave it (systemd reuses it for the next start).
    """

    def __init__(
        self, reactor: Any, spec: ListenerSpec, factory: IProtocolFactory, owner: tuple[int, int] = (-1, -1)
    ) -> None:
        self._reactor = reactor
        self.spec = spec
        self._factory = factory
        self._owner = owner
        self.port: IListeningPort | None = None

    def open(self) -> None:
        spec = self.spec
        endpoint = endpoint_for(self._reactor, spec)
        if spec.kind == "unix":
            assert spec.path is not None
            prepare_socket_path(spec.path)
            old_umask = os.umask(0o177)  # no window with a wider mode before the chmod
            try:
                port = _listened(endpoint, self._factory, spec)
            finally:
                os.umask(old_umask)
            if self._owner != (-1, -1):
                os.chown(spec.path, *self._owner)
        elif spec.kind == "systemd" and spec.domain == "UNIX":
            path, mode = _unix_socket_file(endpoint)
            port = _listened(endpoint, self._factory, spec)
            if path is not None:
                os.chmod(path, mode)  # adopting re-applies a default 0666; put systemd's mode back
        else:
            port = _listened(endpoint, self._factory, spec)
        self.port = port
        log.info("Listening on {where}", where=str(spec))

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        port, self.port = self.port, None
        if not self.closed() or port is None:
            return succeed(None)
        if self.spec.kind == "systemd" and self.spec.domain == "UNIX":
            # Closing the port would unlink the socket file systemd owns: stop accepting only.
            stop_reading = getattr(port, "stopReading", None)
            if stop_reading is not None:
                stop_reading()
            return succeed(None)
        stopped = port.stopListening()  # removes a UNIX socket file
        return stopped if stopped is not None else succeed(None)


def _listened(endpoint: IStreamServerEndpoint, factory: IProtocolFactory, spec: ListenerSpec) -> IListeningPort:
    """Listen now; the endpoints used here answer synchronously."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise StartupError(f"Cannot listen on {spec}: the endpoint did not answer")
    result = outcome[0]
    if isinstance(result, BaseException) or hasattr(result, "getErrorMessage"):
        message = result.getErrorMessage() if hasattr(result, "getErrorMessage") else str(result)
        raise StartupError(f"Cannot listen on {spec}: {message}")
    port: IListeningPort = result
    return port


def _unix_socket_file(endpoint: IStreamServerEndpoint) -> tuple[str | None, int]:
    """The path and mode of an inherited UNIX socket (None for an abstract or unnamed one)."""
    fileno = getattr(endpoint, "fileno", None)
    if fileno is None:
        return None, 0
    probe = socket.socket(fileno=fileno)
    try:
        path = probe.getsockname()
    finally:
        probe.detach()
    if not isinstance(path, str) or not path or path.startswith("\0"):
        return None, 0
    return path, stat.S_IMODE(os.stat(path).st_mode)
