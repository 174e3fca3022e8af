"""Bearer-token auth end to end: real daemons (``--simulate --signing-key-path``) over UDS and TCP.

Covers spec §3 (pipeline order), §6.3 (``/auth/whoami``), §11 (key file, token
rules, §11.5 behaviour matrix) and the W1 fix (scopes are checked on the path the
router matches). Tokens are crafted with PyJWT, an implementation independent of
``zeusd.auth``, or issued by the real ``zeusd token issue`` command.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest

from tests.daemon import Daemon, Response, Transport, run_zeusd, terminate, write_signing_key
from tests.conftest import DaemonFactory, make_transport

# PyJWT warns about HS384/HS512 keys shorter than the hash; irrelevant for tokens that must fail.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

JSON = "application/json"
WWW_AUTH = 'Bearer realm="zeusd"'
AUTH_REQUIRED = "Authentication required. Provide an Authorization: Bearer <token> header."
ALL_SCOPES = ["gpu-control", "gpu-read", "cpu-read"]

# One request per endpoint of each group. Control commands target GPU 1 so that
# GPU 0's power limit stays untouched for the escalation tests below.
GPU_CONTROL = [
    "/gpu/set_persistence_mode?gpu_ids=1&enabled=true&block=true",
    "/gpu/set_power_limit?gpu_ids=1&power_limit_mw=300000&block=true",
    "/gpu/set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz=500&max_clock_mhz=1500&block=true",
    "/gpu/reset_gpu_locked_clocks?gpu_ids=1&block=true",
    "/gpu/set_mem_locked_clocks?gpu_ids=1&min_clock_mhz=500&max_clock_mhz=1500&block=true",
    "/gpu/reset_mem_locked_clocks?gpu_ids=1&block=true",
]
GPU_READ = [
    "/gpu/get_power",
    "/gpu/get_power?gpu_ids=0",
    "/gpu/get_cumulative_energy?gpu_ids=0,1",
    "/gpu/get_power_limit?gpu_ids=0",
    "/gpu/stream_power",
]
CPU_READ = [
    "/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=true",
    "/cpu/get_power",
    "/cpu/stream_power",
]
ENDPOINTS = (
    [("POST", p, "gpu-control") for p in GPU_CONTROL]
    + [("GET", p, "gpu-read") for p in GPU_READ]
    + [("GET", p, "cpu-read") for p in CPU_READ]
)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "signing.key"
    write_signing_key(path)
    return path


@pytest.fixture(scope="module")
def key(key_path: Path) -> bytes:
    return key_path.read_bytes()


@pytest.fixture(scope="module", params=["unix", "tcp"])
def auth_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, key_path: Path
) -> Iterator[Daemon]:
    """One simulated node with auth on, per transport, shared by the module's read-mostly tests."""
    directory = tmp_path_factory.mktemp(f"auth-{request.param}")
    daemon = Daemon(
        make_transport(str(request.param), directory),
        ["--simulate", "--signing-key-path", str(key_path)],
        {},
        directory / "zeusd.log",
    )
    daemon.start()
    yield daemon
    terminate(daemon)


def token(key: bytes, sub: Any = "alice", scopes: Any = ALL_SCOPES, *, alg: str = "HS256", **claims: Any) -> str:
    """A token built by PyJWT, an implementation independent of zeusd.auth."""
    payload: dict[str, Any] = {"sub": sub, "scopes": scopes, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not _DROP}, key, algorithm=alg)


_DROP: Any = object()  # pass as a claim value to leave that claim out


def b64url(data: bytes, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(data).decode("ascii")
    return text if pad else text.rstrip("=")


def hand_token(key: bytes, header: Any, payload: Any, pad: bool = False) -> str:
    """A token signed by hand (for encodings PyJWT will not produce)."""
    signing_input = f"{b64url(json.dumps(header).encode(), pad)}.{b64url(json.dumps(payload).encode(), pad)}"
    sig = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig, pad)}"


def assert_401(r: Response, secret: str | None = None) -> str:
    """A 401 per E10-E12; returns the error text. The token must never be echoed."""
    assert r.status == 401, (r.status, r.body)
    assert r.headers["www-authenticate"] == WWW_AUTH
    assert r.headers["content-type"] == JSON
    if secret:
        assert secret.encode() not in r.body
        for part in secret.split("."):
            if len(part) >= 8:
                assert part.encode() not in r.body
    return r.error


def power_limit(daemon: Daemon, key: bytes, gpu: int = 0) -> int:
    body = daemon.client.get(f"/gpu/get_power_limit?gpu_ids={gpu}", token=token(key, "admin")).json()
    return int(body[str(gpu)]["power_limit_mw"])


# --------------------------------------------------------------------------- open endpoints


def test_discover_and_time_are_open(auth_daemon: Daemon) -> None:
    c = auth_daemon.client
    for headers in ({}, {"Authorization": "Bearer not-a-valid-jwt"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        r = c.get("/discover", headers=headers)
        assert r.status == 200 and r.json()["auth_required"] is True
        r = c.get("/time", headers=headers)
        assert r.status == 200 and isinstance(r.json()["timestamp_ms"], int)


def test_auth_required_false_without_key(sim_daemon: Daemon) -> None:
    assert sim_daemon.client.get("/discover").json()["auth_required"] is False


def test_without_key_tokens_are_ignored(sim_daemon: Daemon) -> None:
    """§11.5: auth off → 200 whatever the Authorization header says."""
    c = sim_daemon.client
    assert c.get("/gpu/get_power").status == 200
    assert c.get("/gpu/get_power", headers={"Authorization": "Bearer garbage"}).status == 200
    assert c.get("/cpu/get_power", headers={"Authorization": "Basic Zm9vOmJhcg=="}).status == 200


# --------------------------------------------------------------------------- the §11.5 matrix


@pytest.mark.parametrize(("method", "path", "group"), ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
def test_matrix(auth_daemon: Daemon, key: bytes, method: str, path: str, group: str) -> None:
    c = auth_daemon.client
    # No token → 401 with the challenge and a JSON error.
    r = c.request(method, path)
    assert assert_401(r) == AUTH_REQUIRED

    # Valid token without the group's scope → 403 naming user, scope and the token's scopes in order.
    others = [s for s in reversed(ALL_SCOPES) if s != group]
    r = c.request(method, path, token=token(key, "mallory", others))
    assert r.status == 403 and r.headers["content-type"] == JSON
    listed = ", ".join(f"'{s}'" for s in others)
    assert r.error == f"Token for user 'mallory' lacks required scope '{group}'. Token scopes: [{listed}]"
    assert "www-authenticate" not in r.headers
    r = c.request(method, path, token=token(key, "nobody-at-all", []))
    assert r.status == 403 and r.error.endswith("Token scopes: []") and "'nobody-at-all'" in r.error

    # With exactly that scope (and no exp) → 200.
    good = token(key, "bob", [group])
    if "stream_power" in path:
        with c.stream(path, token=good) as s:
            assert s.status == 200
            assert s.headers["content-type"] == "text/event-stream"
            (event,) = s.events(1)
            assert isinstance(event["timestamp_ms"], int) and event["power_mw"]
    else:
        r = c.request(method, path, token=good)
        assert r.status == 200, r.body
        if method == "GET":
            assert r.headers["content-type"] == JSON and r.json()


def test_expiring_full_token_is_accepted_everywhere(auth_daemon: Daemon, key: bytes) -> None:
    full = token(key, "carol", ALL_SCOPES, exp=int(time.time()) + 3600)
    c = auth_daemon.client
    for method, path, _ in ENDPOINTS:
        if "stream_power" not in path:
            assert c.request(method, path, token=full).status == 200, path


def test_unknown_paths_need_a_token_then_404(auth_daemon: Daemon, key: bytes) -> None:
    """Auth runs before routing: an unknown path is 401 without a token, 404 with one."""
    c = auth_daemon.client
    for path in ("/gpu/no_such_thing", "/cpu/nothing", "/nowhere", "/auth/other"):
        assert_401(c.get(path))
        r = c.get(path, token=token(key))
        assert r.status == 404, (path, r.status)


def test_disabled_group_is_404_before_auth(start_daemon: DaemonFactory, key_path: Path, transport_kind: str) -> None:
    """§3 step 2: a disabled group answers 404 JSON whatever the token, even with none."""
    key = key_path.read_bytes()
    daemon = start_daemon(
        "--simulate", "--enable", "gpu-read", "--signing-key-path", str(key_path), transport=transport_kind
    )
    c = daemon.client
    for tok in (None, "garbage", token(key, "x", []), token(key)):
        r = c.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true", token=tok)
        assert r.status == 404 and r.error == "API group 'gpu-control' is not enabled on this server."
        r = c.get("/cpu/get_power", token=tok)
        assert r.status == 404 and r.error == "API group 'cpu-read' is not enabled on this server."
    assert_401(c.get("/gpu/get_power"))
    assert c.get("/gpu/get_power", token=token(key, "x", ["gpu-read"])).status == 200


# --------------------------------------------------------------------------- hand-crafted tokens


def _bad_tokens(key: bytes) -> dict[str, tuple[str, str]]:
    """name → (token, expected error text or prefix)."""
    now = int(time.time())
    valid = token(key, "alice", ["gpu-read"])
    unsigned = jwt.encode({"sub": "alice", "scopes": ["gpu-read"]}, None, algorithm="none")  # type: ignore[arg-type]
    return {
        "wrong key": (token(os.urandom(45), "alice", ["gpu-read"]), "Invalid token: InvalidSignature"),
        "key without its newline": (token(key.rstrip(b"\n"), "alice", ["gpu-read"]), "Invalid token: InvalidSignature"),
        "HS384": (token(key, "alice", ["gpu-read"], alg="HS384"), "Invalid token: InvalidAlgorithm"),
        "HS512": (token(key, "alice", ["gpu-read"], alg="HS512"), "Invalid token: InvalidAlgorithm"),
        "alg none": (unsigned, "Invalid token:"),
        "alg none with a valid signature": (
            hand_token(key, {"alg": "none", "typ": "JWT"}, {"sub": "alice", "scopes": ["gpu-read"]}),
            "Invalid token:",
        ),
        "valid header, signature stripped": (valid.rsplit(".", 1)[0] + ".", "Invalid token: InvalidSignature"),
        "expired long ago": (token(key, "alice", ["gpu-read"], exp=now - 3600), "Token has expired."),
        "expired beyond the 60 s leeway": (token(key, "alice", ["gpu-read"], exp=now - 75), "Token has expired."),
        "missing sub": (token(key, _DROP, ["gpu-read"]), "Invalid token: JSON error: missing field `sub`"),
        "missing scopes": (token(key, "alice", _DROP), "Invalid token: JSON error: missing field `scopes`"),
        "scopes a string": (token(key, "alice", "gpu-read"), "Invalid token: JSON error: invalid type"),
        "scopes a map": (token(key, "alice", {"gpu-read": True}), "Invalid token: JSON error: invalid type"),
        "sub a number": (token(key, 42, ["gpu-read"]), "Invalid token: JSON error: invalid type"),
        "unknown scope name": (token(key, "alice", ["gpu-read", "root"]), "Invalid token: JSON error: unknown variant"),
        "scope in the wrong case": (token(key, "alice", ["GPU-READ"]), "Invalid token: JSON error: unknown variant"),
        "float exp": (token(key, "alice", ["gpu-read"], exp=now + 3600.5), "Invalid token: JSON error: invalid type"),
        "aud claim": (token(key, "alice", ["gpu-read"], aud="zeusd"), "Invalid token: InvalidAudience"),
        "garbage": ("not-a-valid-jwt", "Invalid token: InvalidToken"),
        "two parts": (".".join(valid.split(".")[:2]), "Invalid token:"),
        "four parts": (valid + ".xyz", "Invalid token:"),
        "padded signature": (valid + "=", "Invalid token:"),
        "all parts padded": (
            hand_token(key, {"typ": "JWT", "alg": "HS256"}, {"sub": "alicee", "scopes": ["gpu-read"]}, pad=True),
            "Invalid token:",
        ),
        "payload of another token": (
            ".".join([valid.split(".")[0], token(key, "root", ALL_SCOPES).split(".")[1], valid.split(".")[2]]),
            "Invalid token: InvalidSignature",
        ),
    }


BAD_TOKEN_NAMES = list(_bad_tokens(b"k" * 64))


@pytest.mark.parametrize("name", BAD_TOKEN_NAMES)
def test_bad_tokens_are_401(auth_daemon: Daemon, key: bytes, name: str) -> None:
    bad, expected = _bad_tokens(key)[name]
    if "padded" in name:
        assert "=" in bad
    for path in ("/gpu/get_power", "/auth/whoami"):
        error = assert_401(auth_daemon.client.get(path, token=bad), bad)
        assert error.startswith(expected), (name, error)


HEADER_VARIANTS = {
    "Bearer without space": lambda t: f"Bearer{t}",
    "lower-case scheme": lambda t: f"bearer {t}",
    "upper-case scheme": lambda t: f"BEARER {t}",
    "two spaces": lambda t: f"Bearer  {t}",
    "no scheme": lambda t: t,
    "Basic": lambda t: "Basic " + base64.b64encode(f"alice:{t}".encode()).decode(),
    "Token scheme": lambda t: f"Token {t}",
    "empty": lambda t: "",
    "Bearer only": lambda t: "Bearer ",
}


@pytest.mark.parametrize("name", list(HEADER_VARIANTS))
def test_malformed_authorization_headers(auth_daemon: Daemon, key: bytes, name: str) -> None:
    good = token(key, "alice", ALL_SCOPES)
    header = HEADER_VARIANTS[name](good)
    r = auth_daemon.client.get("/gpu/get_power", headers={"Authorization": header})
    error = assert_401(r, good)
    # Only the exact scheme "Bearer " is read as a token (the next space is then part of the token).
    assert error == (AUTH_REQUIRED if name != "two spaces" else "Invalid token: Base64 error: Invalid symbol 32, offset 0.")


def test_non_ascii_authorization_header(auth_daemon: Daemon, key: bytes) -> None:
    good = token(key, "alice", ALL_SCOPES)
    with auth_daemon.transport.raw_socket() as sock:
        sock.sendall(
            b"GET /gpu/get_power HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
            + good.encode()
            + b"\xc3\xa9\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 401 ")
    assert good.encode() not in data


def test_extra_claims_are_accepted(auth_daemon: Daemon, key: bytes) -> None:
    """§11.3 step 7: iat, nbf (even in the future), iss, jti and unknown claims are ignored."""
    now = int(time.time())
    extra = token(key, "alice", ["gpu-read"], iat=now, nbf=now + 86400, iss="someone", jti="1", team="x")
    assert auth_daemon.client.get("/gpu/get_power", token=extra).status == 200
    no_typ = hand_token(key, {"alg": "HS256"}, {"sub": "alice", "scopes": ["gpu-read"], "exp": None})
    assert auth_daemon.client.get("/gpu/get_power", token=no_typ).status == 200


def test_expiry_leeway_both_sides(auth_daemon: Daemon, key: bytes) -> None:
    """Expired by 45 s is still inside the 60 s leeway; by 75 s it is not (margins absorb slow runs)."""
    now = int(time.time())
    c = auth_daemon.client
    assert c.get("/gpu/get_power", token=token(key, "alice", ["gpu-read"], exp=now - 45)).status == 200
    assert assert_401(c.get("/gpu/get_power", token=token(key, "alice", ["gpu-read"], exp=now - 75))) == (
        "Token has expired."
    )


def test_token_with_padding_would_verify_without_it(auth_daemon: Daemon, key: bytes) -> None:
    """The padded variant is refused although the same token unpadded is accepted."""
    claims = {"sub": "alicee", "scopes": ["gpu-read"]}
    header = {"typ": "JWT", "alg": "HS256"}
    assert auth_daemon.client.get("/gpu/get_power", token=hand_token(key, header, claims)).status == 200
    assert_401(auth_daemon.client.get("/gpu/get_power", token=hand_token(key, header, claims, pad=True)))


# --------------------------------------------------------------------------- scope escalation


#: Ways to spell the one control route, each with the API group the daemon classifies it under (its scope
#: is what a token needs to get further), or None when it is no route of any group (404 for every token).
ESCALATION_PATHS: dict[str, str | None] = {
    "/gpu/%73et_power_limit": "gpu-control",
    "/gpu/%73%65%74_power_limit": "gpu-control",
    "/gpu/set%5fpower_limit": "gpu-control",
    "//gpu/set_power_limit": None,
    "/gpu//set_power_limit": "gpu-read",
    "/gpu/./set_power_limit": "gpu-read",
    "/gpu/%2e/set_power_limit": "gpu-read",
    "/gpu/../gpu/set_power_limit": "gpu-read",
    "/gpu/%2e%2e/gpu/set_power_limit": "gpu-read",
    "/gpu/get_power/../set_power_limit": "gpu-read",
    "/cpu/../gpu/set_power_limit": "cpu-read",
    "/GPU/set_power_limit": None,
    "/gpu/SET_POWER_LIMIT": "gpu-read",
    "/gpu/set_power_limit/": "gpu-control",
    "/gpu%2fset_power_limit": None,
    "/gpu/set_power_limit%00": "gpu-control",
    "/gpu/set_power_limit;x": "gpu-control",
    "http://localhost/gpu/set_power_limit": "gpu-control",  # absolute-form target (RFC 9112 3.2.2)
}


@pytest.mark.parametrize("scopes", [["gpu-read"], ["gpu-read", "cpu-read"], ["cpu-read"]], ids=str)
def test_scope_escalation_attempts_fail(auth_daemon: Daemon, key: bytes, scopes: list[str]) -> None:
    c = auth_daemon.client
    before = power_limit(auth_daemon, key)
    target = 234_000 if before != 234_000 else 345_000
    weak = token(key, "eve", scopes)
    for path, group in ESCALATION_PATHS.items():
        r = c.post(f"{path}?gpu_ids=0&power_limit_mw={target}&block=true", token=weak)
        assert r.headers.get("content-type") == JSON, path
        if group is not None and group not in scopes:
            refusal = f"Token for user 'eve' lacks required scope '{group}'. Token scopes: {scopes}"
            assert (r.status, r.error) == (403, refusal), path
        else:
            assert (r.status, r.error) == (404, f"No such endpoint: POST {path}"), path
    # Queued non-blocking variants would land later: read back after a blocking no-op on GPU 0.
    r = c.post("/gpu/%73et_power_limit?gpu_ids=0&power_limit_mw=1&block=false", token=weak)
    assert r.status == 403 and "'gpu-control'" in r.error
    assert c.get("/gpu/get_power_limit?gpu_ids=0", token=token(key, "admin")).status == 200
    assert power_limit(auth_daemon, key) == before


def test_encoded_path_with_full_token_reaches_the_handler(auth_daemon: Daemon, key: bytes) -> None:
    """The decoded path is what both the scope check and the router see (W1 fix), consistently."""
    c = auth_daemon.client
    full = token(key, "admin", ["gpu-control", "gpu-read"])
    before = power_limit(auth_daemon, key, 2)
    target = 456_000 if before != 456_000 else 567_000
    assert c.post(f"/gpu/%73et_power_limit?gpu_ids=2&power_limit_mw={target}&block=true", token=full).status == 200
    assert power_limit(auth_daemon, key, 2) == target
    # A gpu-read token passes /gpu/%67et_power, which is a gpu-read endpoint.
    assert c.get("/gpu/%67et_power", token=token(key, "eve", ["gpu-read"])).status == 200
    assert c.get("/gpu/%67et_power", token=token(key, "eve", ["cpu-read"])).status == 403


# --------------------------------------------------------------------------- /auth/whoami


def test_whoami(auth_daemon: Daemon, key: bytes) -> None:
    c = auth_daemon.client
    exp = int(time.time()) + 3600
    r = c.get("/auth/whoami?ignored=1", token=token(key, "alice", ["cpu-read", "gpu-read"], exp=exp, iss="x"))
    assert r.status == 200 and r.headers["content-type"] == JSON
    assert r.json() == {"sub": "alice", "scopes": ["cpu-read", "gpu-read"], "exp": exp}
    assert list(r.json()) == ["sub", "scopes", "exp"]
    r = c.get("/auth/whoami", token=token(key, "bob", ["gpu-control"]))
    assert r.json() == {"sub": "bob", "scopes": ["gpu-control"]}
    r = c.get("/auth/whoami", token=hand_token(key, {"alg": "HS256"}, {"sub": "nil", "scopes": [], "exp": None}))
    assert r.json() == {"sub": "nil", "scopes": []}
    assert assert_401(c.get("/auth/whoami")) == AUTH_REQUIRED


def test_whoami_without_key_is_404_json(sim_daemon: Daemon) -> None:
    for tok in (None, "anything"):
        r = sim_daemon.client.get("/auth/whoami", token=tok)
        assert r.status == 404 and r.headers["content-type"] == JSON
        assert r.json() == {"error": "Authentication is not enabled on this server."}


# --------------------------------------------------------------------------- interop with issuers


def test_token_from_zeusd_token_issue_works(auth_daemon: Daemon, key_path: Path, key: bytes) -> None:
    before = int(time.time())
    result = run_zeusd(
        ["token", "issue", "--signing-key-path", str(key_path), "--user", "dave",
         "--scope", "gpu-read,cpu-read", "--expires", "1h"]
    )
    assert result.returncode == 0, result.stderr
    issued = result.stdout.strip()
    c = auth_daemon.client
    assert c.get("/gpu/get_power", token=issued).status == 200
    assert c.get("/cpu/get_power", token=issued).status == 200
    r = c.post("/gpu/set_persistence_mode?gpu_ids=1&enabled=false&block=true", token=issued)
    assert r.status == 403 and "'dave'" in r.error and "'gpu-control'" in r.error
    who = c.get("/auth/whoami", token=issued).json()
    assert who["sub"] == "dave" and who["scopes"] == ["gpu-read", "cpu-read"]
    assert before + 3600 <= who["exp"] <= int(time.time()) + 3600
    # And PyJWT agrees it is an ordinary HS256 token over the raw key bytes.
    assert jwt.decode(issued, key, algorithms=["HS256"])["sub"] == "dave"


def test_pyjwt_token_over_raw_key_bytes_works(auth_daemon: Daemon, key: bytes) -> None:
    assert key.endswith(b"\n")
    tok = jwt.encode({"sub": "erin", "scopes": ["gpu-read"], "exp": int(time.time()) + 60}, key, algorithm="HS256")
    assert auth_daemon.client.get("/gpu/get_power", token=tok).status == 200
    decoded_key = base64.b64decode(key)  # the "obvious" mistake: base64-decoding the file
    wrong = jwt.encode({"sub": "erin", "scopes": ["gpu-read"]}, decoded_key, algorithm="HS256")
    assert assert_401(auth_daemon.client.get("/gpu/get_power", token=wrong)) == "Invalid token: InvalidSignature"


# --------------------------------------------------------------------------- key file refused at startup


@pytest.mark.parametrize(
    ("mode", "data", "hint"),
    [
        (0o644, None, "chmod 600"),
        (0o666, None, "chmod 600"),
        (0o604, None, "chmod 600"),
        (0o600, b"c2hvcnQta2V5LWJ5dGVz\n", "openssl rand"),
        (0o600, b"0123456789abcdef0123456789abcde\n", "openssl rand"),
    ],
    ids=["0644", "0666", "0604", "short", "31-bytes"],
)
def test_startup_refuses_bad_key_files(
    tmp_path: Path, transport_kind: str, mode: int, data: bytes | None, hint: str
) -> None:
    key_file = tmp_path / "weak.key"
    written = write_signing_key(key_file, data, mode)
    transport: Transport = make_transport(transport_kind, tmp_path)
    result = run_zeusd(["serve", "--simulate", *transport.serve_args, "--signing-key-path", str(key_file)])
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert hint in lines[0] and str(key_file) in lines[0]
    secret = written.strip().decode()
    assert secret not in result.stdout and secret not in result.stderr
    assert not (tmp_path / "zeusd.sock").exists()


def test_startup_accepts_exactly_32_bytes_group_readable(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    """The boundary of the hardening: 32 bytes of material in a 0640 file is fine."""
    key_file = tmp_path / "ok.key"
    data = write_signing_key(key_file, base64.b64encode(os.urandom(24)) + b"\n", 0o640)
    assert len(data.strip()) == 32
    daemon = start_daemon("--simulate", "--signing-key-path", str(key_file))
    assert daemon.client.get("/gpu/get_power", token=token(data, "a", ["gpu-read"])).status == 200


def test_startup_missing_and_empty_key(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    missing = tmp_path / "missing.key"
    result = run_zeusd(["serve", "--simulate", "--socket-path", sock, "--signing-key-path", str(missing)])
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: Failed to read signing key from '{missing}': No such file or directory (os error 2)"
    empty = tmp_path / "empty.key"
    write_signing_key(empty, b"")
    result = run_zeusd(["serve", "--simulate", "--socket-path", sock, "--signing-key-path", str(empty)])
    assert result.returncode == 1 and result.stderr.strip() == f"Error: Signing key file '{empty}' is empty"
    assert not Path(sock).exists()
