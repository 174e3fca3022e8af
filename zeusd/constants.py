"""Values the daemon and its clients must agree on, in a module both may import."""

#: Upstream v0.4.0's socket path; the Zeus clients and ``zeusd watch`` look here too.
DEFAULT_SOCKET_PATH = "/var/run/zeusd.sock"
