"""Bearer-token authentication: key loading, token issuing and verification.

Pure logic (no HTTP, no reactor) so that the web layer, the ``zeusd token issue``
command and the tests share one implementation of spec §11 and §12.8. Failures
are domain errors (:class:`AuthenticationError`, :class:`ScopeError`); the web
layer alone turns them into 401/403 responses.

Interop contract (spec §11.6): tokens are JWS compact HS256 with the signing
key being the key file's *raw bytes* (trailing newline included); what we issue
is byte-identical to upstream zeusd v0.4.0, and what upstream issues verifies here.

Verification is PyJWT's (structure, the HS256 allow-list, the constant-time
signature check, required claims), with small explicit checks for what PyJWT
accepts and upstream (jsonwebtoken 9.3) does not: padded or non-canonical
base64url, header fields of the wrong type, duplicated names, claims of the
wrong type (``exp`` must be an integer, not a float or a boolean), and any
``aud``. Claims are parsed only after the signature matched (through PyJWT's
``_decode_payload`` hook, documented for overriding). Expiry is checked here, not by
PyJWT, so that fresh and cached tokens follow one rule on one injectable clock:
upstream's ``exp < floor(now) - leeway`` (PyJWT compares ``<=`` against a
fractional wall clock, up to a second stricter).
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import math
import os
import re
import shlex
import stat
import threading
import time
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Final, Sequence

import jwt
from jwt.algorithms import HMACAlgorithm

from zeusd.errors import AuthenticationError, ScopeError, StartupError

if TYPE_CHECKING:
    from jwt.types import Options
from zeusd.groups import SCOPE_NAMES, ApiGroup

__all__ = [
    "AUTH_REQUIRED_MESSAGE",
    "EXPIRED_MESSAGE",
    "MIN_KEY_MATERIAL_BYTES",
    "AuthenticationError",
    "Claims",
    "ScopeError",
    "TokenVerifier",
    "extract_bearer_token",
    "issue_token",
    "load_signing_key",
    "parse_expires",
    "parse_scopes",
    "required_scope_check",
    "scope_names",
]

# --------------------------------------------------------------------------- constants

#: E10 text, upstream's wording.
AUTH_REQUIRED_MESSAGE: Final = "Authentication required. Provide an Authorization: Bearer <token> header."

#: E11 text.
EXPIRED_MESSAGE: Final = "Token has expired."

#: Our hardening (project decision, W16): RFC 7518 §3.2 wants >= 256 bits for HS256.
MIN_KEY_MATERIAL_BYTES: Final = 32

#: A key file larger than this is certainly not a key; bounds the read (e.g. a device file).
_MAX_KEY_FILE_BYTES: Final = 1 << 20

#: Upstream's fixed header, exact bytes and key order (spec §11.2).
_HEADER_JSON: Final = b'{"typ":"JWT","alg":"HS256"}'

#: Algorithm names jsonwebtoken 9.3 knows; anything else is a JSON error there, not InvalidAlgorithm.
_KNOWN_ALGS: Final = ("HS256", "HS384", "HS512", "ES256", "ES384", "RS256", "RS384", "RS512",
                      "PS256", "PS384", "PS512", "EdDSA")

#: The largest ``exp`` upstream can hold (``usize`` on 64-bit).
_MAX_EXP: Final = 2**64 - 1

#: Tokens longer than this are verified but never cached (bounds the cache's memory).
_MAX_CACHED_TOKEN_LEN: Final = 4096

_NOT_B64URL_RE: Final = re.compile(r"[^A-Za-z0-9_-]")
# Visible ASCII plus horizontal tab: what actix's HeaderValue::to_str() accepts.
_BAD_HEADER_BYTE_RE: Final = re.compile(rb"[^\t\x20-\x7e]")


def scope_names() -> tuple[str, ...]:
    """All valid scope names, in ApiGroup declaration order (for messages).

    Membership comes from SCOPE_NAMES so groups added later are picked up; the
    order only makes messages stable and readable.
    """
    ordered = [g.value for g in ApiGroup if g.value in SCOPE_NAMES]
    return tuple(ordered) + tuple(sorted(SCOPE_NAMES.difference(ordered)))


# --------------------------------------------------------------------------- errors

class _Invalid(Exception):
    """Internal: a verification failure whose text follows ``Invalid token: ``."""


# --------------------------------------------------------------------------- claims


@dataclasses.dataclass(frozen=True)
class Claims:
    """A verified token's claims; immutable so cached instances can be shared."""

    sub: str
    scopes: tuple[str, ...]
    exp: int | None = None

    def whoami_body(self) -> dict[str, Any]:
        """The ``/auth/whoami`` body (§6.3): scopes in token order, ``exp`` omitted when absent."""
        body: dict[str, Any] = {"sub": self.sub, "scopes": list(self.scopes)}
        if self.exp is not None:
            body["exp"] = self.exp
        return body

    def has_scope(self, group: str) -> bool:
        return _group_name(group) in self.scopes


def _group_name(group: str) -> str:
    return group.value if isinstance(group, ApiGroup) else str(group)


def required_scope_check(claims: Claims, group: str) -> None:
    """Raise ScopeError unless ``claims`` grant ``group`` (§3 step 7; the web layer answers 403).

    ``group`` may be an ApiGroup or its name.
    """
    name = _group_name(group)
    if name not in claims.scopes:
        raise ScopeError(claims.sub, name, claims.scopes)


# --------------------------------------------------------------------------- key file


def load_signing_key(path: str) -> bytes:
    """Read the HMAC key: the file's entire raw bytes (§11.1), plus our hardening.

    Raw bytes (newline included, no decoding) keep tokens interchangeable with
    upstream daemons and issuers using the same file. Hardening (project
    decision): refuse files that 'other' can read or write, and keys with fewer
    than 32 bytes of material. Messages never contain key bytes.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise StartupError(f"Failed to read signing key from '{path}': {_os_error_text(e)}") from None
    if not data:
        raise StartupError(f"Signing key file '{path}' is empty")
    quoted = shlex.quote(path)
    if mode & 0o006:
        raise StartupError(
            f"Signing key file '{path}' is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"restrict it with `chmod 600 {quoted}` (and make the daemon's user its owner)"
        )
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise StartupError(f"Signing key file '{path}' is too large to be a key (over {_MAX_KEY_FILE_BYTES} bytes)")
    material = len(data.strip())
    if material < MIN_KEY_MATERIAL_BYTES:
        raise StartupError(
            f"Signing key in '{path}' is too short: {material} bytes of key material, "
            f"at least {MIN_KEY_MATERIAL_BYTES} are required. Create a good key with "
            f"`openssl rand -base64 32 > {quoted} && chmod 600 {quoted}`"
        )
    if not _usable_hmac_key(data):
        raise StartupError(
            f"Signing key in '{path}' looks like a public/private key, certificate or JWK, which is not "
            f"used as an HMAC secret. Create a random key with `openssl rand -base64 32 > {quoted} && chmod 600 {quoted}`"
        )
    return data


_HS256: Final = HMACAlgorithm(HMACAlgorithm.SHA256)


def _usable_hmac_key(key: bytes) -> bool:
    """PyJWT refuses HMAC keys that look like PEM, SSH, DER or JWK keys: find out at startup, not per request."""
    try:
        _HS256.prepare_key(key)
    except jwt.InvalidKeyError:
        return False
    return True


def _os_error_text(e: OSError) -> str:
    """Rust's io::Error display (``No such file or directory (os error 2)``), as upstream prints it."""
    if e.errno is not None and e.strerror:
        return f"{e.strerror} (os error {e.errno})"
    return str(e)


# --------------------------------------------------------------------------- issuing


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _sign(key: bytes, signing_input: bytes) -> str:
    return _b64url(hmac.digest(key, signing_input, "sha256"))


_HEADER_B64: Final = _b64url(_HEADER_JSON)


def issue_token(key: bytes, sub: str, scopes: Sequence[str], exp: int | None) -> str:
    """Sign a token byte-identical to upstream's ``zeusd token issue`` (§11.2, §11.6).

    Header and claim order, compact JSON and UTF-8 output (non-ASCII left
    unescaped, like serde_json) make the token reproducible bit for bit.
    """
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("signing key must be non-empty bytes")
    if not isinstance(sub, str):
        raise ValueError("sub must be a string")
    if isinstance(scopes, str):
        raise ValueError("scopes must be a sequence of scope names, not a string")
    names = [_group_name(s) for s in scopes]
    for name in names:
        if name not in SCOPE_NAMES:
            raise ValueError(_unknown_scope_message(name))
    claims: dict[str, Any] = {"sub": sub, "scopes": names}
    if exp is not None:
        if type(exp) is not int or not 0 <= exp <= _MAX_EXP:
            raise ValueError("exp must be a non-negative integer or None")
        claims["exp"] = exp
    try:
        payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("sub is not valid Unicode text") from None
    signing_input = f"{_HEADER_B64}.{_b64url(payload)}"
    return f"{signing_input}.{_sign(bytes(key), signing_input.encode('ascii'))}"


# --------------------------------------------------------------------------- CLI helpers


def _unknown_scope_message(name: str) -> str:
    return f"Invalid scope '{name}'. Valid scopes: {', '.join(scope_names())}"


def parse_scopes(values: Sequence[str]) -> list[str]:
    """``--scope`` values: comma-separated and/or repeated, order and duplicates kept (§12.8).

    Pieces are matched exactly (no trimming, case-sensitive), as clap does.
    """
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for piece in value.split(","):
            if piece not in SCOPE_NAMES:
                raise ValueError(_unknown_scope_message(piece))
            out.append(piece)
    return out


_NS: Final = Fraction(1, 10**9)
_DURATION_UNITS: Final[dict[str, Fraction]] = {
    **dict.fromkeys(("ns", "nsec", "nanos"), _NS),
    **dict.fromkeys(("us", "usec", "\u00b5s"), _NS * 1000),
    **dict.fromkeys(("ms", "msec", "millis"), _NS * 10**6),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), Fraction(1)),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), Fraction(60)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), Fraction(3600)),
    **dict.fromkeys(("d", "day", "days"), Fraction(86400)),
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), Fraction(7 * 86400)),
    **dict.fromkeys(("month", "months"), Fraction(2_630_016)),  # 30.44 d
    **dict.fromkeys(("y", "yr", "yrs", "year", "years"), Fraction(31_557_600)),  # 365.25 d
}
_DURATION_TERM_RE: Final = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([a-z\u00b5]+)")


def parse_expires(text: str, now: float) -> int | None:
    """``--expires`` (§12.8): ``never``/``0`` → None, else ``floor(now + duration)``.

    The input is trimmed and lower-cased first (so ``1M`` is one *minute*), then
    read as humantime terms ``<n>[.<frac>]<unit>``, optionally space-separated.
    Exact rational arithmetic avoids float rounding in the floor.
    """
    err = ValueError(f"Invalid duration '{text}'. Use e.g. '1h', '7d', '30d', or 'never'.")
    s = text.strip().lower()
    if s in ("never", "0"):
        return None
    pos, total = 0, Fraction(0)
    while pos < len(s):
        m = _DURATION_TERM_RE.match(s, pos)
        if m is None:
            raise err
        whole, frac, unit = m.groups()
        factor = _DURATION_UNITS.get(unit)
        if factor is None or int(whole) > _MAX_EXP:
            raise err
        number = Fraction(int(whole)) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        total += number * factor
        pos = m.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    if pos == 0:  # empty after trimming
        raise err
    if not math.isfinite(now):
        raise ValueError("now must be finite")
    exp = math.floor(Fraction(now) + total)
    if not 0 <= exp <= _MAX_EXP:
        raise err
    return exp


# --------------------------------------------------------------------------- verification


def extract_bearer_token(header: bytes | str | None) -> str:
    """§3 step 5: the header must exist, be visible ASCII and start with exactly ``Bearer ``."""
    missing = AuthenticationError("missing", AUTH_REQUIRED_MESSAGE)
    if header is None:
        raise missing
    if isinstance(header, str):
        try:
            header = header.encode("ascii")
        except UnicodeEncodeError:
            raise missing from None
    if _BAD_HEADER_BYTE_RE.search(header) is not None or not header.startswith(b"Bearer "):
        raise missing
    return header[7:].decode("ascii")


def _b64decode(seg: str) -> bytes:
    """Unpadded, canonical base64url only (Rust's URL_SAFE_NO_PAD): PyJWT also accepts ``=`` padding."""
    bad = _NOT_B64URL_RE.search(seg)
    if bad is not None:
        what = "padding" if bad.group() == "=" else f"symbol {ord(bad.group())}, offset {bad.start()}."
        raise _Invalid(f"Base64 error: Invalid {what}")
    if len(seg) % 4 == 1:
        raise _Invalid("Base64 error: Invalid input length.")
    data = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    if _b64url(data) != seg:  # unused low bits set: another spelling of the same bytes
        raise _Invalid(f"Base64 error: Invalid last symbol {ord(seg[-1])}, offset {len(seg) - 1}.")
    return data


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Reject duplicated names: serde refuses them, Python would keep the last one silently."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate field `{k}`")
            seen.add(k)
    return d


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)


def _parse_object(data: bytes, what: str) -> dict[str, Any]:
    """Strict UTF-8 JSON (no NaN, no duplicated names) that must be an object; errors as ``JSON error: …``."""
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Invalid("JSON error: invalid UTF-8") from None
    except json.JSONDecodeError as e:
        raise _Invalid(f"JSON error: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise _Invalid(f"JSON error: {_short(str(e), 60)}") from None
    if not isinstance(value, dict):
        raise _Invalid(f"JSON error: invalid type: {_unexpected(value)}, expected struct {what}")
    return value


def _short(s: str, limit: int = 32) -> str:
    """A bounded, printable rendering of a value for messages (never the token itself)."""
    out = "".join(c if c.isprintable() and c.isascii() else "?" for c in s[:limit])
    return out + ("..." if len(s) > limit else "")


def _unexpected(v: Any) -> str:
    """serde's wording for a JSON value in a type error."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{_short(v)}"'
    return "sequence" if isinstance(v, list) else "map"


def _listed(names: Sequence[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _type_error(value: Any, expected: str) -> _Invalid:
    return _Invalid(f"JSON error: invalid type: {_unexpected(value)}, expected {expected}")


#: jsonwebtoken's Header fields and their types (each may be null); other fields are ignored.
_HEADER_STRINGS: Final = ("typ", "cty", "jku", "kid", "x5u", "x5t", "x5t#S256")


def _check_header(seg: str) -> None:
    """The header as upstream accepts it: ``alg`` HS256, known fields of the right type (§11.3 step 2)."""
    header = _parse_object(_b64decode(seg), "Header")
    if "alg" not in header:
        raise _Invalid("JSON error: missing field `alg`")
    alg = header["alg"]
    if not isinstance(alg, str):
        raise _type_error(alg, "a string")
    if alg not in _KNOWN_ALGS:
        raise _Invalid(f"JSON error: unknown variant `{_short(alg)}`, expected one of {_listed(_KNOWN_ALGS)}")
    if alg != "HS256":
        raise _Invalid("InvalidAlgorithm")
    for name in _HEADER_STRINGS:
        if header.get(name) is not None and not isinstance(header[name], str):
            raise _type_error(header[name], f"a string for `{name}`")
    x5c = header.get("x5c")
    if x5c is not None and not (isinstance(x5c, list) and all(isinstance(c, str) for c in x5c)):
        raise _type_error(x5c, "a sequence of strings for `x5c`")
    if header.get("jwk") is not None and not isinstance(header["jwk"], dict):
        raise _type_error(header["jwk"], "a map for `jwk`")


def _check_claims(payload: dict[str, Any]) -> dict[str, Any]:
    """Upstream's claim types, in document order (the first bad one is reported)."""
    for name, value in payload.items():
        if name == "sub":
            if not isinstance(value, str):
                raise _type_error(value, "a string")
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Invalid("JSON error: lone surrogate in `sub`") from None
        elif name == "scopes":
            if not isinstance(value, list):
                raise _type_error(value, "a sequence")
            for item in value:
                if not isinstance(item, str):
                    raise _type_error(item, "a scope name")
                if item not in SCOPE_NAMES:
                    raise _Invalid(f"JSON error: unknown variant `{_short(item)}`, expected one of {_listed(scope_names())}")
        elif name == "exp" and value is not None:
            if type(value) is not int:  # not a float, not a boolean
                raise _type_error(value, "usize")
            if not 0 <= value <= _MAX_EXP:
                raise _Invalid(f"JSON error: invalid value: {_unexpected(value)}, expected usize")
    for required in ("sub", "scopes"):
        if required not in payload:
            raise _Invalid(f"JSON error: missing field `{required}`")
    return payload


class _StrictClaimsJWT(jwt.PyJWT):
    """PyJWT, with the payload parsed strictly and type-checked once the signature matched."""

    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        return _check_claims(_parse_object(decoded["payload"], "Claims"))


#: What PyJWT checks beyond the signature: presence of the required claims. Time claims and
#: ``aud`` are ours (upstream checks no ``iat``/``nbf``/``jti``; ``exp`` and ``aud`` below).
_PYJWT_OPTIONS: Final["Options"] = {
    "require": ["sub", "scopes"],
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_jti": False,
}

#: PyJWT's failures as upstream names them (other PyJWT errors keep their own text).
_PYJWT_ERRORS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (jwt.InvalidSignatureError, "InvalidSignature"),
    (jwt.InvalidAlgorithmError, "InvalidAlgorithm"),
)


class TokenVerifier:
    """Verifies ``Authorization`` headers against one HS256 key (spec §3 step 5, §11.3).

    Thread-safe. Keeps a small FIFO cache of recently *verified* tokens (keyed
    by the full token string) so a client's repeated requests skip the HMAC and
    JSON work; ``exp`` is re-checked on every hit and failures are never cached.
    The key may be of any non-empty length here: the length policy is enforced
    by :func:`load_signing_key`, and the spec's test vectors use a 23-byte key
    (PyJWT warns about it with ``InsecureKeyLengthWarning``).
    """

    def __init__(
        self,
        key: bytes,
        leeway_s: int = 60,
        *,
        cache_size: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise ValueError("signing key must be non-empty bytes")
        if not _usable_hmac_key(bytes(key)):
            raise ValueError("signing key looks like an asymmetric key, certificate or JWK, not an HMAC secret")
        if leeway_s < 0 or cache_size < 0:
            raise ValueError("leeway_s and cache_size must be >= 0")
        self._key = bytes(key)
        self._leeway = int(leeway_s)
        self._clock = clock
        self._cache_size = cache_size
        self._cache: dict[str, Claims] = {}
        self._lock = threading.Lock()
        self._jwt = _StrictClaimsJWT()

    def __repr__(self) -> str:  # never show the key
        return f"TokenVerifier(leeway_s={self._leeway}, cache_size={self._cache_size})"

    def verify_authorization(self, header: bytes | str | None) -> Claims:
        """The whole of §3 steps 5-6: the claims, or AuthenticationError."""
        return self.verify_token(extract_bearer_token(header))

    def check_scope(self, claims: Claims, group: str) -> None:
        """§3 step 7, so a verifier is all the web root needs from this module."""
        required_scope_check(claims, group)

    def verify_token(self, token: str) -> Claims:
        """Verify a bare token (the part after ``Bearer ``)."""
        now = int(self._clock())
        cached = self._cache.get(token)
        if cached is not None:
            if self._expired(cached, now):
                with self._lock:
                    self._cache.pop(token, None)
                raise AuthenticationError("expired", EXPIRED_MESSAGE)
            return cached
        try:
            claims = self._verify_uncached(token, now)
        except _Invalid as e:
            raise AuthenticationError("invalid", f"Invalid token: {e}") from None
        if self._cache_size and len(token) <= _MAX_CACHED_TOKEN_LEN:
            with self._lock:
                while len(self._cache) >= self._cache_size:
                    del self._cache[next(iter(self._cache))]
                self._cache[token] = claims
        return claims

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _expired(self, claims: Claims, now: int) -> bool:
        # jsonwebtoken: expired iff exp < now - leeway, with now in whole seconds.
        return claims.exp is not None and claims.exp < now - self._leeway

    def _verify_uncached(self, token: str, now: int) -> Claims:
        # Pre-checks, in upstream's order: three parts split from the right (extra
        # dots stay in the header part), the header, a canonical 32-byte signature.
        if not token.isascii() or token.count(".") < 2:
            raise _Invalid("InvalidToken")
        message, _, signature = token.rpartition(".")
        header_seg, _, payload_seg = message.rpartition(".")
        _check_header(header_seg)
        try:
            signature_bytes = _b64decode(signature)
        except _Invalid:
            signature_bytes = b""
        if len(signature_bytes) != 32:  # upstream compares the base64 text: any other spelling fails
            raise _Invalid("InvalidSignature")
        _b64decode(payload_seg)  # PyJWT would accept it padded
        try:
            payload = self._jwt.decode(token, self._key, algorithms=["HS256"], options=_PYJWT_OPTIONS)
        except jwt.InvalidTokenError as e:
            for kind, name in _PYJWT_ERRORS:
                if isinstance(e, kind):
                    raise _Invalid(name) from None
            raise _Invalid(_short(str(e), 80)) from None
        claims = Claims(sub=payload["sub"], scopes=tuple(payload["scopes"]), exp=payload.get("exp"))
        # Expiry, then audience, in jsonwebtoken's order; any ``aud`` at all is refused.
        if self._expired(claims, now):
            raise AuthenticationError("expired", EXPIRED_MESSAGE)
        if "aud" in payload:
            raise _Invalid("InvalidAudience")
        return claims
