"""Unit tests for zeusd.auth: key loading, issuing, verification, CLI parsing (spec §11, §12.8)."""

from __future__ import annotations

import base64
import json
import math
from fractions import Fraction
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

try:
    import zeusd  # noqa: F401
except ImportError:  # running without an installed package / rootdir on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jwt  # PyJWT, used as an independent implementation

from zeusd.auth import (
    AUTH_REQUIRED_MESSAGE,
    AuthenticationError,
    Claims,
    ScopeError,
    TokenVerifier,
    issue_token,
    load_signing_key,
    parse_expires,
    parse_scopes,
    required_scope_check,
    scope_names,
)
from zeusd.errors import StartupError
from zeusd.groups import SCOPE_NAMES, ApiGroup

SPEC_KEY = b"zeusd-spec-example-key\n"
VECTOR_ALICE = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9."
    "eyJzdWIiOiJhbGljZSIsInNjb3BlcyI6WyJncHUtcmVhZCIsImNwdS1yZWFkIl0sImV4cCI6MjAwMDAwMDAwMH0."
    "h76_ONDG27DPd0-19Uz0sgRqEfaFiZ7nwTvQLPeZm50"
)
VECTOR_BOB = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9."
    "eyJzdWIiOiJib2IiLCJzY29wZXMiOlsiZ3B1LWNvbnRyb2wiXX0."
    "3y04g2MPHvGc28fItLN3x5ljnosQITd-j1HGCtpQ43c"
)
KEY = b"0123456789abcdef0123456789abcdef0123456789ab\n"  # 45 bytes, like `openssl rand -base64 32`
OTHER_KEY = b"ffffffffffffffffffffffffffffffffffffffffffff\n"
NOW = 1_800_000_000

# The spec's test vectors use a 23-byte key, which PyJWT rightly warns about.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(key: bytes, signing_input: str) -> str:
    import hashlib
    import hmac

    return b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def craft(payload: Any, header: Any = None, key: bytes = KEY) -> str:
    """A token built by hand (raw JSON text allowed), HS256-signed with ``key``."""
    if header is None:
        header = {"typ": "JWT", "alg": "HS256"}
    h = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    p = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    signing_input = f"{b64(h.encode())}.{b64(p.encode())}"
    return f"{signing_input}.{hs256(key, signing_input)}"


def pyjwt_encode(payload: dict[str, Any], key: Any = KEY, algorithm: str = "HS256", **kw: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jwt.encode(payload, key, algorithm=algorithm, **kw)


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(KEY, clock=lambda: NOW + 0.75)


def bearer(token: str) -> bytes:
    return b"Bearer " + token.encode()


def invalid(v: TokenVerifier, header: bytes | str | None) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as ei:
        v.verify_authorization(header)
    err = ei.value
    assert str(err) == err.message
    return err


def invalid_token(v: TokenVerifier, token: str) -> str:
    err = invalid(v, bearer(token))
    assert err.message.startswith("Invalid token: "), err.message
    # never echo the token (or its parts) back
    for part in token.split("."):
        if len(part) > 8:
            assert part not in err.message
    return err.message[len("Invalid token: "):]


# --------------------------------------------------------------------------- issuing


def test_spec_vectors_are_reproduced() -> None:
    assert issue_token(SPEC_KEY, "alice", ["gpu-read", "cpu-read"], 2000000000) == VECTOR_ALICE
    assert issue_token(SPEC_KEY, "bob", ["gpu-control"], None) == VECTOR_BOB


def test_spec_vectors_verify() -> None:
    v = TokenVerifier(SPEC_KEY, clock=lambda: NOW)
    assert v.verify_authorization(bearer(VECTOR_ALICE)) == Claims("alice", ("gpu-read", "cpu-read"), 2000000000)
    assert v.verify_authorization(bearer(VECTOR_BOB)) == Claims("bob", ("gpu-control",), None)


def test_issue_exact_layout() -> None:
    token = issue_token(KEY, "carol", [ApiGroup.CPU_READ, "gpu-read", "cpu-read"], 5)
    h, p, _ = token.split(".")
    assert base64.urlsafe_b64decode(h + "==") == b'{"typ":"JWT","alg":"HS256"}'
    assert base64.urlsafe_b64decode(p + "==") == b'{"sub":"carol","scopes":["cpu-read","gpu-read","cpu-read"],"exp":5}'
    assert "=" not in token
    empty = issue_token(KEY, "dave", [], None)
    assert base64.urlsafe_b64decode(empty.split(".")[1] + "==") == b'{"sub":"dave","scopes":[]}'


def test_issue_non_ascii_sub_is_raw_utf8_like_serde() -> None:
    token = issue_token(KEY, "zoë \"q\" \n", ["gpu-read"], None)
    p = token.split(".")[1]
    assert base64.urlsafe_b64decode(p + "==") == '{"sub":"zoë \\"q\\" \\n","scopes":["gpu-read"]}'.encode()
    assert TokenVerifier(KEY).verify_token(token).sub == "zoë \"q\" \n"


@pytest.mark.parametrize(
    "scopes, exp, why",
    [(["gpu-write"], None, "Invalid scope 'gpu-write'. Valid scopes: gpu-control, gpu-read, cpu-read, metrics"),
     (["GPU-READ"], None, "Invalid scope 'GPU-READ'"),
     ("gpu-read", None, "scopes must be a sequence of scope names, not a string"),
     (["gpu-read"], -1, "exp must be a non-negative integer or None"),
     (["gpu-read"], 1.5, "exp must be a non-negative integer or None"),
     (["gpu-read"], True, "exp must be a non-negative integer or None")],
)
def test_issue_rejects_bad_input(scopes: Any, exp: Any, why: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(why)}"):
        issue_token(KEY, "x", scopes, exp)


def test_issue_unknown_scope_message() -> None:
    with pytest.raises(ValueError, match="gpu-write") as ei:
        issue_token(KEY, "x", ["gpu-read", "gpu-write"], None)
    for name in SCOPE_NAMES:
        assert name in str(ei.value)


def test_round_trip_and_pyjwt_cross_check(verifier: TokenVerifier) -> None:
    token = issue_token(KEY, "alice", ["gpu-read"], NOW + 3600)
    assert verifier.verify_authorization(bearer(token)) == Claims("alice", ("gpu-read",), NOW + 3600)
    # An independent implementation accepts what we issue ...
    decoded = jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_exp": False})
    assert decoded == {"sub": "alice", "scopes": ["gpu-read"], "exp": NOW + 3600}
    # ... and we accept what it issues (its header order is alg, typ).
    other = pyjwt_encode({"sub": "bob", "scopes": ["cpu-read", "gpu-control"], "exp": NOW})
    assert verifier.verify_token(other) == Claims("bob", ("cpu-read", "gpu-control"), NOW)
    no_typ = pyjwt_encode({"sub": "eve", "scopes": []}, headers={"typ": None})
    assert '"typ"' not in base64.urlsafe_b64decode(no_typ.split(".")[0] + "==").decode()
    assert verifier.verify_token(no_typ) == Claims("eve", (), None)


def test_claims_whoami_body() -> None:
    assert Claims("alice", ("gpu-read", "cpu-read"), 9999999999).whoami_body() == {
        "sub": "alice", "scopes": ["gpu-read", "cpu-read"], "exp": 9999999999}
    body = Claims("bob", ("gpu-control",), None).whoami_body()
    assert body == {"sub": "bob", "scopes": ["gpu-control"]}
    assert "exp" not in body
    assert json.dumps(Claims("a", (), 0).whoami_body(), separators=(",", ":")) == '{"sub":"a","scopes":[],"exp":0}'


# --------------------------------------------------------------------------- header extraction


@pytest.mark.parametrize(
    "header",
    [None, b"", b"Bearer", b"bearer " + VECTOR_ALICE.encode(), b"BEARER x.y.z", b"Basic dXNlcjpwYXNz",
     b"Bearer\t" + VECTOR_ALICE.encode(), b"Bearer  " + b"\xff", "Bearer é".encode(), b"Bearer \x00abc",
     b"Bearer a\x7fb", b" Bearer x.y.z", "Bearer ünïcode"],
)
def test_missing_or_malformed_header_is_e10(header: Any) -> None:
    v = TokenVerifier(SPEC_KEY, clock=lambda: NOW)
    err = invalid(v, header)
    assert err.message == AUTH_REQUIRED_MESSAGE
    assert err.reason == "missing"


def test_str_header_and_exact_prefix() -> None:
    v = TokenVerifier(SPEC_KEY, clock=lambda: NOW)
    assert v.verify_authorization("Bearer " + VECTOR_BOB).sub == "bob"
    # a second space becomes part of the token, which then fails to decode
    assert invalid_token(v, " " + VECTOR_BOB).startswith("Base64 error")


def test_empty_token_after_prefix_is_invalid_token() -> None:
    v = TokenVerifier(KEY)
    assert invalid(v, b"Bearer ").message == "Invalid token: InvalidToken"


# --------------------------------------------------------------------------- token structure


def test_garbage_two_part_four_part(verifier: TokenVerifier) -> None:
    good = issue_token(KEY, "a", ["gpu-read"], None)
    h, p, s = good.split(".")
    assert invalid_token(verifier, "not-a-valid-jwt") == "InvalidToken"
    assert invalid_token(verifier, f"{h}.{p}") == "InvalidToken"
    assert invalid_token(verifier, f"{h}.{p}.{s}.{s}").startswith("Base64 error")
    assert invalid_token(verifier, f"{h}.{h}.{p}.{s}").startswith("Base64 error")
    assert invalid_token(verifier, "..") .startswith("JSON error")
    assert invalid_token(verifier, f"{h}.{p}.") == "InvalidSignature"


def test_padded_base64_rejected(verifier: TokenVerifier) -> None:
    header = '{"alg":"HS256","kid":"a"}'  # 25 bytes: its base64 needs padding
    sub = next(u for u in ("a", "ab", "abc") if len(b64(json.dumps({"sub": u, "scopes": []}).encode())) % 4)
    good = craft({"sub": sub, "scopes": []}, header=header)
    h, p, s = good.split(".")
    assert len(h) % 4 and len(p) % 4 and len(s) % 4
    verifier.verify_token(good)
    hp = h + "=" * (-len(h) % 4)
    pp = p + "=" * (-len(p) % 4)
    sp = s + "=" * (-len(s) % 4)
    assert invalid_token(verifier, f"{hp}.{p}.{hs256(KEY, f'{hp}.{p}')}") == "Base64 error: Invalid padding"
    assert invalid_token(verifier, f"{h}.{pp}.{hs256(KEY, f'{h}.{pp}')}") == "Base64 error: Invalid padding"
    assert invalid_token(verifier, f"{h}.{p}.{sp}") == "InvalidSignature"
    assert invalid_token(verifier, f"{hp}.{p}.{s}") == "Base64 error: Invalid padding"
    # PyJWT's decoder would accept each of these (it re-pads and ignores '=')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert jwt.decode(f"{h}.{p}.{sp}", KEY, algorithms=["HS256"])["sub"] == sub


def test_non_canonical_and_foreign_base64_rejected(verifier: TokenVerifier) -> None:
    good = issue_token(KEY, "a", ["gpu-read"], None)
    h, p, s = good.split(".")
    # last char of a 43-char signature carries 2 unused bits: flip one -> same bytes, other text
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = s[:-1] + alphabet[alphabet.index(s[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(s + "=")
    assert invalid_token(verifier, f"{h}.{p}.{twin}") == "InvalidSignature"
    # standard-alphabet characters and junk in the signature
    std = s.replace("-", "+").replace("_", "/")
    if std != s:
        assert invalid_token(verifier, f"{h}.{p}.{std}") == "InvalidSignature"
    # a payload whose encoding contains '-' or '_', re-spelled with the standard alphabet
    std_token = next(t for t in (craft({"sub": "a", "scopes": [], "x": "?" * n + "~>"}) for n in range(12))
                     if "-" in t.split(".")[1] or "_" in t.split(".")[1])
    h2, p2, _ = std_token.split(".")
    assert "-" in p2 or "_" in p2
    p2std = p2.replace("-", "+").replace("_", "/")
    assert invalid_token(verifier, f"{h2}.{p2std}.{hs256(KEY, f'{h2}.{p2std}')}").startswith(
        "Base64 error: Invalid symbol")
    assert invalid_token(verifier, f"{h}.{p}.{s[:10]}!{s[10:]}") == "InvalidSignature"
    # junk in the header: base64 error naming the offset only
    assert invalid_token(verifier, f"{h[:5]}!{h[5:]}.{p}.{s}") == "Base64 error: Invalid symbol 33, offset 5."


def test_non_ascii_token_via_verify_token(verifier: TokenVerifier) -> None:
    with pytest.raises(AuthenticationError) as ei:
        verifier.verify_token("é.é.é")
    assert ei.value.message == "Invalid token: InvalidToken"


# --------------------------------------------------------------------------- algorithms


def test_wrong_key_rejected(verifier: TokenVerifier) -> None:
    assert invalid_token(verifier, issue_token(OTHER_KEY, "a", ["gpu-read"], None)) == "InvalidSignature"
    assert invalid_token(verifier, pyjwt_encode({"sub": "a", "scopes": []}, key=OTHER_KEY)) == "InvalidSignature"


def test_alg_none_rejected(verifier: TokenVerifier) -> None:
    token = pyjwt_encode({"sub": "a", "scopes": ["gpu-control"]}, key=None, algorithm="none")
    assert token.endswith(".")
    assert invalid_token(verifier, token).startswith("JSON error: unknown variant `none`")
    # with a correct HMAC appended it is still refused: the header decides
    forged = craft({"sub": "a", "scopes": ["gpu-control"]}, header={"alg": "none"})
    assert invalid_token(verifier, forged).startswith("JSON error: unknown variant `none`")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_rejected(verifier: TokenVerifier, alg: str) -> None:
    token = pyjwt_encode({"sub": "a", "scopes": ["gpu-read"]}, algorithm=alg)
    assert invalid_token(verifier, token) == "InvalidAlgorithm"


def test_rs256_rejected_real_and_confused(verifier: TokenVerifier) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = pyjwt_encode({"sub": "a", "scopes": ["gpu-read"]}, key=priv, algorithm="RS256")
    assert invalid_token(verifier, token) == "InvalidAlgorithm"
    # algorithm confusion: RS256 header but HMAC-signed with our key
    assert invalid_token(verifier, craft({"sub": "a", "scopes": []}, header={"alg": "RS256", "typ": "JWT"})) == (
        "InvalidAlgorithm")
    for alg in ("ES256", "PS512", "EdDSA"):
        assert invalid_token(verifier, craft({"sub": "a", "scopes": []}, header={"alg": alg})) == "InvalidAlgorithm"


@pytest.mark.parametrize(
    "header, detail",
    [({"typ": "JWT"}, "JSON error: missing field `alg`"),
     ({"alg": "hs256"}, "JSON error: unknown variant `hs256`"),
     ({"alg": 256}, "JSON error: invalid type: integer `256`"),
     ("[]", "JSON error: invalid type: sequence"),
     ("{not json", "JSON error: "),
     ('{"alg":"HS256","alg":"none"}', "JSON error: duplicate field `alg`")],
)
def test_bad_headers_rejected(verifier: TokenVerifier, header: Any, detail: str) -> None:
    assert invalid_token(verifier, craft({"sub": "a", "scopes": []}, header=header)).startswith(detail)


@pytest.mark.parametrize(
    "header, detail",
    [({"alg": "HS256", "kid": 5}, "JSON error: invalid type: integer `5`, expected a string for `kid`"),
     ({"alg": "HS256", "typ": ["JWT"]}, "JSON error: invalid type: sequence, expected a string for `typ`"),
     ({"alg": "HS256", "x5c": "MIIB"}, "JSON error: invalid type: string \"MIIB\", expected a sequence of strings for `x5c`"),
     ({"alg": "HS256", "jwk": "k"}, "JSON error: invalid type: string \"k\", expected a map for `jwk`"),
     ({"alg": "HS256", "crit": ["exp"], "exp": 1}, "Unsupported critical extension: exp")],
)
def test_header_fields_of_the_wrong_type_rejected(verifier: TokenVerifier, header: Any, detail: str) -> None:
    """jsonwebtoken's Header types its known fields; PyJWT also refuses critical extensions it does not know."""
    assert invalid_token(verifier, craft({"sub": "a", "scopes": []}, header=header)) == detail


def test_known_header_fields_of_the_right_type_accepted(verifier: TokenVerifier) -> None:
    header = {"alg": "HS256", "typ": None, "cty": "JWT", "x5c": ["MIIB"], "jwk": {"kty": "oct"}, "x5t#S256": "x"}
    assert verifier.verify_token(craft({"sub": "a", "scopes": []}, header=header)).sub == "a"


@pytest.mark.parametrize(
    "payload",
    [{"sub": 5, "scopes": []}, '{"sub":"a","sub":"b","scopes":[]}', {"sub": "a"}, "[1]", "{not json",
     {"sub": "a", "scopes": [], "exp": 1.5}],
)
def test_claims_are_read_only_after_the_signature_matched(verifier: TokenVerifier, payload: Any) -> None:
    """A forged token is refused for its signature, whatever its payload holds."""
    assert invalid_token(verifier, craft(payload, key=OTHER_KEY)) == "InvalidSignature"


def test_other_header_fields_ignored(verifier: TokenVerifier) -> None:
    token = craft({"sub": "a", "scopes": []}, header={"alg": "HS256", "typ": "at+jwt", "kid": "k1", "zzz": [1]})
    assert verifier.verify_token(token).sub == "a"


# --------------------------------------------------------------------------- claims


@pytest.mark.parametrize(
    "payload, detail",
    [({"sub": "alice"}, "JSON error: missing field `scopes`"),
     ({"scopes": ["gpu-read"]}, "JSON error: missing field `sub`"),
     ({"sub": 5, "scopes": []}, "JSON error: invalid type: integer `5`, expected a string"),
     ({"sub": None, "scopes": []}, "JSON error: invalid type: null, expected a string"),
     ({"sub": "a", "scopes": "gpu-read"}, "JSON error: invalid type: string \"gpu-read\", expected a sequence"),
     ({"sub": "a", "scopes": {"gpu-read": True}}, "JSON error: invalid type: map, expected a sequence"),
     ({"sub": "a", "scopes": None}, "JSON error: invalid type: null, expected a sequence"),
     ({"sub": "a", "scopes": ["gpu-read", "gpu-admin"]}, "JSON error: unknown variant `gpu-admin`, expected one of"),
     ({"sub": "a", "scopes": ["GPU-READ"]}, "JSON error: unknown variant `GPU-READ`"),
     ({"sub": "a", "scopes": [1]}, "JSON error: invalid type: integer `1`"),
     ({"sub": "a", "scopes": [], "exp": 1.7e9}, "JSON error: invalid type: floating point"),
     ({"sub": "a", "scopes": [], "exp": 2000000000.0}, "JSON error: invalid type: floating point"),
     ({"sub": "a", "scopes": [], "exp": True}, "JSON error: invalid type: boolean `true`, expected usize"),
     ({"sub": "a", "scopes": [], "exp": -1}, "JSON error: invalid value: integer `-1`, expected usize"),
     ({"sub": "a", "scopes": [], "exp": "2000000000"}, "JSON error: invalid type: string"),
     ({"sub": "a", "scopes": [], "exp": 2**64}, "JSON error: invalid value"),
     ('{"sub":"a","scopes":[],"exp":NaN}', "JSON error: "),
     ('{"sub":"a","scopes":["cpu-read"],"scopes":["gpu-control"]}', "JSON error: duplicate field `scopes`"),
     ('{"sub":"a","sub":"root","scopes":[]}', "JSON error: duplicate field `sub`"),
     ('["gpu-read"]', "JSON error: invalid type: sequence, expected struct Claims"),
     ('"x"', "JSON error: invalid type: string"),
     ("", "JSON error: "),
     ('{"sub":"\\ud800","scopes":[]}', "JSON error: "),
     ("[" * 100000 + "]" * 100000, "JSON error: ")],
)
def test_bad_claims_rejected(verifier: TokenVerifier, payload: Any, detail: str) -> None:
    assert invalid_token(verifier, craft(payload)).startswith(detail)


def test_unknown_scope_lists_valid_ones(verifier: TokenVerifier) -> None:
    detail = invalid_token(verifier, craft({"sub": "a", "scopes": ["nope"]}))
    for name in SCOPE_NAMES:
        assert f"`{name}`" in detail


def test_payload_not_utf8_rejected(verifier: TokenVerifier) -> None:
    h = b64(b'{"alg":"HS256"}')
    p = b64(b'{"sub":"\xff","scopes":[]}')
    token = f"{h}.{p}.{hs256(KEY, f'{h}.{p}')}"
    assert invalid_token(verifier, token).startswith("JSON error")


def test_optional_and_ignored_claims(verifier: TokenVerifier) -> None:
    token = craft({"sub": "a", "scopes": ["cpu-read", "cpu-read"], "exp": None, "iat": NOW + 10**6,
                   "nbf": NOW + 10**6, "iss": "someone", "jti": "x", "role": {"nested": [1, 2]}, "scope": 5})
    assert verifier.verify_token(token) == Claims("a", ("cpu-read", "cpu-read"), None)
    assert TokenVerifier(KEY, clock=lambda: 30).verify_token(craft({"sub": "", "scopes": [], "exp": 0})) == Claims(
        "", (), 0)


@pytest.mark.parametrize("aud", ["zeusd", "", [], ["zeusd"], None, 5])
def test_aud_present_rejected(verifier: TokenVerifier, aud: Any) -> None:
    assert invalid_token(verifier, craft({"sub": "a", "scopes": [], "aud": aud})) == "InvalidAudience"


# --------------------------------------------------------------------------- expiry


def test_expiry_and_leeway() -> None:
    now = [float(NOW) + 0.9]
    v = TokenVerifier(KEY, clock=lambda: now[0], cache_size=0)
    assert v.verify_token(craft({"sub": "a", "scopes": [], "exp": NOW - 60})).exp == NOW - 60  # within leeway
    assert v.verify_token(craft({"sub": "a", "scopes": [], "exp": NOW + 5})).exp == NOW + 5
    for exp in (NOW - 61, 0, 1):
        err = invalid(v, bearer(craft({"sub": "a", "scopes": [], "exp": exp})))
        assert err.message == "Token has expired."
        assert err.reason == "expired"
    # a bad claim wins over expiry (claims are type-checked first) ...
    assert invalid_token(v, craft({"sub": 1, "scopes": [], "exp": 0})).startswith("JSON error")
    # ... and expiry wins over aud, as in jsonwebtoken
    assert invalid(v, bearer(craft({"sub": "a", "scopes": [], "exp": 0, "aud": "x"}))).message == "Token has expired."
    # a forged token that is also expired still reports the signature, not the expiry
    assert invalid_token(v, craft({"sub": "a", "scopes": [], "exp": 0}, key=OTHER_KEY)) == "InvalidSignature"


def test_custom_leeway() -> None:
    v = TokenVerifier(KEY, leeway_s=0, clock=lambda: NOW)
    assert v.verify_token(craft({"sub": "a", "scopes": [], "exp": NOW})).exp == NOW
    assert invalid(v, bearer(craft({"sub": "a", "scopes": [], "exp": NOW - 1}))).reason == "expired"


def test_zero_second_token_is_accepted_for_the_leeway() -> None:
    exp = parse_expires("0s", NOW + 0.5)
    assert exp == NOW
    token = issue_token(KEY, "a", [], exp)
    assert TokenVerifier(KEY, clock=lambda: NOW + 60.9).verify_token(token).exp == NOW
    assert invalid(TokenVerifier(KEY, clock=lambda: NOW + 61), bearer(token)).reason == "expired"


# --------------------------------------------------------------------------- cache


def test_cache_rechecks_expiry_on_hit() -> None:
    now = [float(NOW)]
    v = TokenVerifier(KEY, clock=lambda: now[0])
    token = issue_token(KEY, "a", ["gpu-read"], NOW + 10)
    first = v.verify_token(token)
    assert v.verify_token(token) is first  # served from the cache
    now[0] = NOW + 70
    assert v.verify_token(token) is first  # still within leeway
    now[0] = NOW + 71
    assert invalid(v, bearer(token)).message == "Token has expired."
    assert invalid(v, bearer(token)).message == "Token has expired."


def test_failures_are_not_cached_and_cache_is_bounded() -> None:
    v = TokenVerifier(KEY, cache_size=4, clock=lambda: NOW)
    bad = issue_token(OTHER_KEY, "a", ["gpu-control"], None)
    for _ in range(3):
        assert invalid_token(v, bad) == "InvalidSignature"
    assert v._cache == {}
    tokens = [issue_token(KEY, f"u{i}", ["gpu-read"], None) for i in range(10)]
    for t in tokens:
        v.verify_token(t)
    assert len(v._cache) == 4
    assert set(v._cache) == set(tokens[-4:])
    # a verifier with another key never sees these cached claims
    assert invalid_token(TokenVerifier(OTHER_KEY), tokens[-1]) == "InvalidSignature"
    v.clear_cache()
    assert v._cache == {}
    assert "KEY" not in repr(v) and KEY.decode().strip() not in repr(v)


# --------------------------------------------------------------------------- scopes and errors


def test_required_scope_check_and_e13() -> None:
    claims = Claims("alice", ("gpu-read", "cpu-read"), None)
    required_scope_check(claims, "gpu-read")
    required_scope_check(claims, ApiGroup.CPU_READ)
    with pytest.raises(ScopeError) as ei:
        required_scope_check(claims, ApiGroup.GPU_CONTROL)
    err = ei.value
    assert (err.sub, err.group, err.scopes) == ("alice", "gpu-control", ("gpu-read", "cpu-read"))
    assert err.message == str(err) == ("Token for user 'alice' lacks required scope 'gpu-control'. "
                                       "Token scopes: ['gpu-read', 'cpu-read']")
    with pytest.raises(ScopeError) as ei:
        required_scope_check(Claims("bob", (), None), "cpu-read")
    assert ei.value.message == "Token for user 'bob' lacks required scope 'cpu-read'. Token scopes: []"
    assert claims.has_scope(ApiGroup.GPU_READ) and not claims.has_scope("gpu-control")


def test_auth_knows_nothing_of_http() -> None:
    """Auth raises domain errors; only the web layer turns them into 401/403 (issue 19)."""
    from zeusd.web.errors import ApiError

    assert not issubclass(AuthenticationError, ApiError) and not issubclass(ScopeError, ApiError)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, zeusd.auth; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    )
    loaded = probe.stdout.split()
    assert "zeusd.auth" in loaded
    assert [m for m in loaded if m.startswith(("twisted.web", "klein", "zeusd.web", "werkzeug"))] == []


def test_scope_names_follow_groups() -> None:
    assert set(scope_names()) == SCOPE_NAMES
    assert scope_names()[:3] == ("gpu-control", "gpu-read", "cpu-read")


# --------------------------------------------------------------------------- key file


def write_key(tmp_path: Path, data: bytes, mode: int = 0o600, name: str = "key") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_key_is_raw_bytes_including_newline(tmp_path: Path) -> None:
    path = write_key(tmp_path, KEY)
    assert load_signing_key(path) == KEY
    assert load_signing_key(path).endswith(b"\n")
    raw = b"\x00\xff" * 20 + b"\r\n\n"
    assert load_signing_key(write_key(tmp_path, raw, name="bin")) == raw


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o660, 0o601])  # 'other' may neither read nor write
def test_key_modes_accepted(tmp_path: Path, mode: int) -> None:
    assert load_signing_key(write_key(tmp_path, KEY, mode)) == KEY


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666, 0o601 | 0o004])
def test_key_modes_refused(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path, KEY, mode)
    with pytest.raises(StartupError) as ei:
        load_signing_key(path)
    msg = str(ei.value)
    assert f"chmod 600 {path}" in msg and path in msg
    assert KEY.decode().strip() not in msg


def test_empty_key_refused_with_upstream_text(tmp_path: Path) -> None:
    path = write_key(tmp_path, b"", 0o644)  # emptiness reported first, like upstream
    with pytest.raises(StartupError) as ei:
        load_signing_key(path)
    assert str(ei.value) == f"Signing key file '{path}' is empty"


def test_missing_key_refused_with_upstream_text(tmp_path: Path) -> None:
    path = str(tmp_path / "absent")
    with pytest.raises(StartupError) as ei:
        load_signing_key(path)
    assert str(ei.value) == f"Failed to read signing key from '{path}': No such file or directory (os error 2)"
    with pytest.raises(StartupError, match=r"Failed to read signing key from .*Is a directory \(os error 21\)"):
        load_signing_key(str(tmp_path))


@pytest.mark.parametrize("data", [b"short-key\n", b"x" * 31, b"   " + b"y" * 31 + b"\n\n\n\n   ", b"\n" * 40])
def test_short_key_refused(tmp_path: Path, data: bytes) -> None:
    path = write_key(tmp_path, data)
    with pytest.raises(StartupError) as ei:
        load_signing_key(path)
    msg = str(ei.value)
    assert f"openssl rand -base64 32 > {path}" in msg
    assert "too short" in msg
    stripped = data.strip()
    if stripped:
        assert stripped.decode() not in msg


@pytest.mark.parametrize(
    "data",
    [b"-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n",
     b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx5bWJvbHMgb2YgYSBrZXkgdGhhdCBpcyBub3Q= user@host\n",
     b'{"kty":"oct","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}\n'],
)
def test_keys_pyjwt_refuses_as_hmac_secrets_are_refused_at_startup(tmp_path: Path, data: bytes) -> None:
    """Such a key would reject every token at request time; say so before serving."""
    path = write_key(tmp_path, data)
    with pytest.raises(StartupError, match="looks like a public/private key, certificate or JWK") as ei:
        load_signing_key(path)
    assert "openssl rand -base64 32" in str(ei.value) and data.decode().strip() not in str(ei.value)
    with pytest.raises(ValueError, match="not an HMAC secret"):
        TokenVerifier(data)


def test_exactly_32_bytes_of_material_accepted(tmp_path: Path) -> None:
    data = b"  " + b"k" * 32 + b"\n"
    assert load_signing_key(write_key(tmp_path, data)) == data


def test_loaded_key_interoperates(tmp_path: Path) -> None:
    path = write_key(tmp_path, KEY)
    key = load_signing_key(path)
    token = issue_token(key, "alice", ["gpu-read"], None)
    assert TokenVerifier(key).verify_token(token).sub == "alice"
    # the trailing newline matters: a trimmed key is a different key
    assert invalid_token(TokenVerifier(key.rstrip(b"\n")), token) == "InvalidSignature"


# --------------------------------------------------------------------------- --expires


@pytest.mark.parametrize(
    "text, seconds",
    [("1ns", 1e-9), ("5nsec", 5e-9), ("7nanos", 7e-9),
     ("1us", 1e-6), ("3usec", 3e-6), ("9µs", 9e-6),
     ("1ms", 1e-3), ("2msec", 2e-3), ("3millis", 3e-3),
     ("1s", 1), ("2sec", 2), ("3secs", 3), ("1second", 1), ("4seconds", 4),
     ("1m", 60), ("2min", 120), ("3mins", 180), ("1minute", 60), ("5minutes", 300),
     ("1h", 3600), ("2hr", 7200), ("3hrs", 10800), ("1hour", 3600), ("24hours", 86400),
     ("1d", 86400), ("7d", 604800), ("30d", 2592000), ("1day", 86400), ("2days", 172800),
     ("1w", 604800), ("1wk", 604800), ("2wks", 1209600), ("1week", 604800), ("2 weeks", 1209600),
     ("1month", 2630016), ("3months", 3 * 2630016),
     ("1y", 31557600), ("1yr", 31557600), ("2yrs", 63115200), ("1year", 31557600), ("2years", 63115200),
     ("1h30m", 5400), ("1h 30m", 5400), ("1.5h", 5400), ("0.5d", 43200), ("2h 37min", 9420),
     ("1M", 60), ("1MONTH", 2630016), ("  1H  ", 3600), ("10 s", 10), ("0s", 0), ("0h", 0),
     ("1d 1h 1m 1s 500ms", 90061.5)],
)
def test_parse_expires_units(text: str, seconds: float) -> None:
    for now in (float(NOW), NOW + 0.25, NOW + 0.999):
        assert parse_expires(text, now) == math.floor(Fraction(now) + Fraction(str(seconds)))


def test_parse_expires_floor_is_exact() -> None:
    assert parse_expires("1s", 1000.5) == 1001
    assert parse_expires("500ms", 1000.5) == 1001
    assert parse_expires("499ms", 1000.5) == 1000
    assert parse_expires("1ns", 1000.0) == 1000


@pytest.mark.parametrize("text", ["never", "0", "NEVER", " Never ", "\tnever\n", " 0 "])
def test_parse_expires_never(text: str) -> None:
    assert parse_expires(text, NOW) is None


@pytest.mark.parametrize(
    "text",
    ["", "   ", "5", "00", "1.5", "-1h", "+1h", "1x", "h", "1.h", ".5h", "1h30", "abc", "1 h 2", "1h,30m",
     "1_000s", "1e3s", "never!", "forever", "1 mo", "99999999999999999999999y", "１h"],
)
def test_parse_expires_invalid(text: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_expires(text, NOW)
    assert str(ei.value) == f"Invalid duration '{text}'. Use e.g. '1h', '7d', '30d', or 'never'."


# --------------------------------------------------------------------------- --scope


def test_parse_scopes() -> None:
    assert parse_scopes([]) == []
    assert parse_scopes(["gpu-read,cpu-read"]) == ["gpu-read", "cpu-read"]
    assert parse_scopes(["gpu-read", "cpu-read"]) == ["gpu-read", "cpu-read"]
    assert parse_scopes(["cpu-read,gpu-read", "cpu-read"]) == ["cpu-read", "gpu-read", "cpu-read"]
    assert parse_scopes(["gpu-control"]) == ["gpu-control"]
    assert parse_scopes("gpu-read") == ["gpu-read"]


@pytest.mark.parametrize("values, bad", [(["gpu-write"], "gpu-write"), (["gpu-read, cpu-read"], " cpu-read"),
                                         (["GPU-READ"], "GPU-READ"), (["gpu-read,"], ""), ([""], "")])
def test_parse_scopes_invalid(values: list[str], bad: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_scopes(values)
    msg = str(ei.value)
    assert f"'{bad}'" in msg
    for name in SCOPE_NAMES:
        assert name in msg


# --------------------------------------------------------------------------- boundaries and exact wording


_MAX_EXP = 2**64 - 1  # exp is a u64 upstream


def test_issue_accepts_exp_from_zero_to_the_u64_maximum() -> None:
    for exp in (0, _MAX_EXP):
        payload = json.loads(base64.urlsafe_b64decode(issue_token(KEY, "x", [], exp).split(".")[1] + "=="))
        assert payload["exp"] == exp
    with pytest.raises(ValueError, match="^exp must be a non-negative integer or None$"):
        issue_token(KEY, "x", [], _MAX_EXP + 1)


@pytest.mark.parametrize(
    ("key", "sub", "why"),
    [(b"", "x", "signing key must be non-empty bytes"), ("a str key", "x", "signing key must be non-empty bytes"),
     (KEY, 5, "sub must be a string"), (KEY, "\udc80", "sub is not valid Unicode text")],
)
def test_issue_refuses_a_bad_key_or_subject_naming_it(key: Any, sub: Any, why: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(why)}$"):
        issue_token(key, sub, ["gpu-read"], None)


def test_parse_expires_at_its_boundaries() -> None:
    assert parse_expires("0s", 0) == 0
    assert parse_expires("1s", _MAX_EXP - 1) == _MAX_EXP
    assert parse_expires(f"{_MAX_EXP}s", 0) == _MAX_EXP
    assert parse_expires("1.05m", 0) == 63  # a decimal fraction of its unit
    for text, now in (("1s", _MAX_EXP), (f"{_MAX_EXP + 1}s", 0)):
        with pytest.raises(ValueError) as ei:
            parse_expires(text, now)
        assert str(ei.value) == f"Invalid duration '{text}'. Use e.g. '1h', '7d', '30d', or 'never'."
    with pytest.raises(ValueError, match="^now must be finite$"):
        parse_expires("1h", float("inf"))


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("abcde", "Base64 error: Invalid input length."),
        ("e31", "Base64 error: Invalid last symbol 49, offset 2."),  # "{}" with its unused low bits set
        (_segment(b'{"alg": false}'), "JSON error: invalid type: boolean `false`, expected a string"),
        (_segment(b'{"alg": true}'), "JSON error: invalid type: boolean `true`, expected a string"),
        (_segment(b"[1]"), "JSON error: invalid type: sequence, expected struct Header"),
        (_segment(b'{"alg": NaN}'), "JSON error: NaN is not valid JSON"),
        (_segment(json.dumps({"alg": "x" * 5 + "\u0001\u00e9"}).encode()),
         "JSON error: unknown variant `xxxxx??`, expected one of `HS256`, `HS384`, `HS512`, `ES256`, `ES384`, "
         "`RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `EdDSA`"),
        (_segment(json.dumps({"alg": "y" * 33}).encode()), f"JSON error: unknown variant `{'y' * 32}...`, expected one of "
         "`HS256`, `HS384`, `HS512`, `ES256`, `ES384`, `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `EdDSA`"),
        (_segment(json.dumps({"alg": "y" * 32}).encode()), f"JSON error: unknown variant `{'y' * 32}`, expected one of "
         "`HS256`, `HS384`, `HS512`, `ES256`, `ES384`, `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `EdDSA`"),
    ],
    ids=["length", "last-symbol", "false", "true", "sequence", "nan", "sanitized", "truncated", "whole"],
)
def test_header_refusals_are_worded_exactly_and_never_echo_raw_input(header: str, message: str) -> None:
    """The header is checked before the signature: these words reach any client (bounded, printable ASCII)."""
    token = f"{header}.e30.{'A' * 43}"
    assert invalid_token(TokenVerifier(KEY, clock=lambda: NOW), token) == message


def test_extra_dots_stay_in_the_header_part_like_upstream() -> None:
    h, p, s = issue_token(KEY, "a", ["gpu-read"], None).split(".")
    v = TokenVerifier(KEY, clock=lambda: NOW)
    # Split from the right: the header part is "h.x", and its '.' is the bad symbol.
    assert invalid_token(v, f"{h}.x.{p}.{s}") == f"Base64 error: Invalid symbol 46, offset {len(h)}."


def test_verified_claims_at_their_limits() -> None:
    v = TokenVerifier(KEY, clock=lambda: NOW)
    assert v.verify_token(jwt.encode({"sub": "a", "scopes": [], "exp": 2**64 - 1}, KEY, algorithm="HS256")).exp == 2**64 - 1
    signed = jwt.encode({"sub": "a", "scopes": [5]}, KEY, algorithm="HS256")
    assert invalid_token(v, signed) == "JSON error: invalid type: integer `5`, expected a scope name"


def test_failure_reasons_and_an_expired_token_leaves_the_cache() -> None:
    clock = [float(NOW)]
    v = TokenVerifier(KEY, leeway_s=0, clock=lambda: clock[0])
    token = issue_token(KEY, "a", ["gpu-read"], NOW + 10)
    v.verify_token(token)
    assert token in v._cache
    clock[0] = NOW + 11
    expired = invalid(v, bearer(token))
    assert (expired.reason, expired.message) == ("expired", "Token has expired.")
    assert token not in v._cache  # not kept to be re-checked on every request
    bad = invalid(v, bearer(token[:-2] + "AA"))
    assert bad.reason == "invalid"


def test_only_tokens_up_to_4096_characters_are_cached() -> None:
    v = TokenVerifier(KEY, clock=lambda: NOW)
    by_length: dict[int, str] = {}
    for n in range(2900, 3100):
        token = issue_token(KEY, "s" * n, [], None)
        by_length.setdefault(len(token), token)
    for length, cached in ((4095, True), (4096, True), (4097, False), (4098, False)):
        if length not in by_length:
            continue  # base64 lengths skip some values
        v.verify_token(by_length[length])
        assert (by_length[length] in v._cache) is cached, length
    assert 4096 in by_length and any(n > 4096 for n in by_length)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [({"key": b""}, "signing key must be non-empty bytes"), ({"key": "text"}, "signing key must be non-empty bytes"),
     ({"key": KEY, "leeway_s": -1}, "leeway_s and cache_size must be >= 0"),
     ({"key": KEY, "cache_size": -1}, "leeway_s and cache_size must be >= 0"),
     ({"key": b"-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"},
      "signing key looks like an asymmetric key, certificate or JWK, not an HMAC secret")],
)
def test_verifier_refuses_a_bad_key_or_setting(kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(why)}$"):
        TokenVerifier(**kwargs)


def test_key_file_size_limit_is_one_mebibyte(tmp_path: Path) -> None:
    limit = 1 << 20
    assert len(load_signing_key(write_key(tmp_path, b"k" * limit, name="exact"))) == limit
    over = write_key(tmp_path, b"k" * (limit + 1), name="over")
    with pytest.raises(StartupError) as ei:
        load_signing_key(over)
    assert str(ei.value) == f"Signing key file '{over}' is too large to be a key (over {limit} bytes)"




def test_the_default_cache_keeps_the_256_most_recent_tokens() -> None:
    v = TokenVerifier(KEY, clock=lambda: NOW)
    tokens = [issue_token(KEY, f"u{n}", [], None) for n in range(257)]
    for token in tokens:
        v.verify_token(token)
    assert len(v._cache) == 256 and tokens[0] not in v._cache and tokens[-1] in v._cache
