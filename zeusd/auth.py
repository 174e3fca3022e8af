"""Bearer-token authentication: key loading, token issuing and verification.

Pure logic (no HTTP, no reactor) so that the web layer, the ``zeusd token issue``
command and the tests share one implementation of spec §11 and §12.8.

Interop contract (spec §11.6): tokens are JWS compact HS256 with the signing
key being the key file's *raw bytes* (trailing newline included); what we issue
is byte-identical to upstream zeusd v0.4.0, and what upstream issues verifies here.

Why verification is hand-rolled rather than PyJWT (the spec's "Rec."):
HS256 verification is one HMAC and a constant-time compare, but wrapping PyJWT
to get upstream's (jsonwebtoken 9.3) strictness needs nearly as much code as
doing it directly: PyJWT's base64 decoder accepts padding and silently drops
characters outside the alphabet (token malleability), ``exp`` is coerced with
``int()`` (floats and booleans pass, ``null`` is an error), an empty ``aud`` is
accepted, the HMAC key is refused if it merely *looks* like a PEM/SSH key, and it
warns on short keys. Doing it by hand keeps every rule of §11.3 explicit in one
place, does not move when PyJWT's defaults change between versions, and costs a
few microseconds. The security-relevant parts are small: only ``alg == "HS256"``
is accepted (decided from the header *before* anything else is trusted), the
signature is compared as its canonical base64url text with
:func:`hmac.compare_digest` (so non-canonical or padded encodings cannot verify),
and the payload is only parsed after the signature matched. PyJWT is still used
by the tests as an independent implementation to cross-check both directions.
"""

from __future__ import annotations

import base64
import binascii
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
from typing import Any, Callable, Final, Sequence

from zeusd.errors import ApiError, StartupError
from zeusd.groups import SCOPE_NAMES, ApiGroup

__all__ = [
    "AUTH_REQUIRED_MESSAGE",
    "MIN_KEY_MATERIAL_BYTES",
    "WWW_AUTHENTICATE",
    "AuthError",
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

#: Value of the ``WWW-Authenticate`` header on every 401 (spec §3, E10-E12).
WWW_AUTHENTICATE: Final = 'Bearer realm="zeusd"'

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

_B64URL_ALPHABET: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
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


class AuthError(ApiError):
    """401: missing/malformed credentials or a token that does not verify.

    ``reason`` ("missing", "expired" or "invalid") is for logs and tests; the
    client only sees ``message``.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(401, message, {"WWW-Authenticate": WWW_AUTHENTICATE})
        self.reason = reason


class ScopeError(ApiError):
    """403: a valid token that lacks the scope of the requested API group (E13)."""

    def __init__(self, sub: str, group: str, scopes: Sequence[str]) -> None:
        listed = ", ".join(f"'{s}'" for s in scopes)
        super().__init__(403, f"Token for user '{sub}' lacks required scope '{group}'. Token scopes: [{listed}]")
        self.sub = sub
        self.group = group


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
    """Raise ScopeError (403) unless ``claims`` grant ``group`` (§3 step 7).

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
    return data


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
    if header is None:
        raise AuthError(AUTH_REQUIRED_MESSAGE, "missing")
    if isinstance(header, str):
        try:
            header = header.encode("ascii")
        except UnicodeEncodeError:
            raise AuthError(AUTH_REQUIRED_MESSAGE, "missing") from None
    if _BAD_HEADER_BYTE_RE.search(header) is not None or not header.startswith(b"Bearer "):
        raise AuthError(AUTH_REQUIRED_MESSAGE, "missing")
    return header[7:].decode("ascii")


def _b64decode_strict(seg: str) -> bytes:
    """base64url, no padding, canonical trailing bits: what Rust's URL_SAFE_NO_PAD accepts.

    Error texts follow the base64 crate's Display; they name offsets, not content.
    """
    if _B64URL_RE.fullmatch(seg) is None:
        for i, ch in enumerate(seg):
            if ch == "=":
                raise _Invalid("Base64 error: Invalid padding")
            if ord(ch) > 127 or ord(ch) not in _B64URL_ALPHABET:
                raise _Invalid(f"Base64 error: Invalid symbol {ord(ch)}, offset {i}.")
    rem = len(seg) % 4
    if rem == 1:
        raise _Invalid("Base64 error: Invalid input length.")
    try:
        data = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - excluded by the checks above
        raise _Invalid("Base64 error: Invalid input length.") from None
    if rem and _b64url(data) != seg:
        raise _Invalid(f"Base64 error: Invalid last symbol {ord(seg[-1])}, offset {len(seg) - 1}.")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_CHECKED_DUPLICATES: Final = frozenset(("sub", "scopes", "exp", "alg"))


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Reject duplicated claim names: serde refuses them, Python would keep the last silently."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen and k in _CHECKED_DUPLICATES:
                raise ValueError(f"duplicate field `{k}`")
            seen.add(k)
    return d


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)


def _parse_json(data: bytes) -> tuple[Any, str]:
    """Strict UTF-8 JSON (no NaN/Infinity, no duplicated claim names), errors as ``JSON error: …``."""
    try:
        text = data.decode("utf-8")
        return _DECODER.decode(text), text
    except UnicodeDecodeError:
        raise _Invalid("JSON error: invalid UTF-8") from None
    except json.JSONDecodeError as e:
        raise _Invalid(f"JSON error: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise _Invalid(f"JSON error: {_short(str(e), 60)}") from None


def _short(s: str, limit: int = 32) -> str:
    """A bounded, printable rendering of a value for messages (never the token itself)."""
    out = "".join(c if c.isprintable() and c.isascii() else "?" for c in s[:limit])
    return out + ("..." if len(s) > limit else "")


def _unexpected(v: Any) -> str:
    """serde's ``Unexpected`` wording for a JSON value."""
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
    if isinstance(v, list):
        return "sequence"
    return "map"


def _end_position(text: str) -> str:
    """serde_json's location after the closing brace (where 'missing field' is reported)."""
    s = text.rstrip(" \t\n\r")
    nl = s.rfind("\n")
    return f"at line {s.count(chr(10)) + 1} column {len(s[nl + 1:].encode('utf-8'))}"


def _check_header(seg: str) -> None:
    """Header: a JSON object whose ``alg`` is HS256 (§11.3 step 2); other fields ignored."""
    header, text = _parse_json(_b64decode_strict(seg))
    if not isinstance(header, dict):
        raise _Invalid(f"JSON error: invalid type: {_unexpected(header)}, expected struct Header")
    if "alg" not in header:
        raise _Invalid(f"JSON error: missing field `alg` {_end_position(text)}")
    alg = header["alg"]
    if not isinstance(alg, str) or alg not in _KNOWN_ALGS:
        what = f"unknown variant `{_short(alg)}`" if isinstance(alg, str) else f"invalid type: {_unexpected(alg)}"
        raise _Invalid(f"JSON error: {what}, expected one of {', '.join(f'`{a}`' for a in _KNOWN_ALGS)}")
    if alg != "HS256":
        raise _Invalid("InvalidAlgorithm")


def _claims_from_payload(payload: Any, text: str) -> tuple[Claims, bool]:
    """Type-check the claims like upstream's serde struct; returns (claims, has ``aud``)."""
    if not isinstance(payload, dict):
        raise _Invalid(f"JSON error: invalid type: {_unexpected(payload)}, expected struct Claims")
    # Check known fields in document order, as serde reports the first bad one.
    for name, value in payload.items():
        if name == "sub":
            if not isinstance(value, str):
                raise _Invalid(f"JSON error: invalid type: {_unexpected(value)}, expected a string")
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Invalid("JSON error: lone surrogate in `sub`") from None
        elif name == "scopes":
            if not isinstance(value, list):
                raise _Invalid(f"JSON error: invalid type: {_unexpected(value)}, expected a sequence")
            for item in value:
                if not isinstance(item, str):
                    raise _Invalid(f"JSON error: invalid type: {_unexpected(item)}, expected enum ApiGroup")
                if item not in SCOPE_NAMES:
                    expected = ", ".join(f"`{n}`" for n in scope_names())
                    raise _Invalid(f"JSON error: unknown variant `{_short(item)}`, expected one of {expected}")
        elif name == "exp":
            if value is not None:
                if type(value) is not int:
                    raise _Invalid(f"JSON error: invalid type: {_unexpected(value)}, expected usize")
                if not 0 <= value <= _MAX_EXP:
                    raise _Invalid(f"JSON error: invalid value: {_unexpected(value)}, expected usize")
    for required in ("sub", "scopes"):
        if required not in payload:
            raise _Invalid(f"JSON error: missing field `{required}` {_end_position(text)}")
    claims = Claims(sub=payload["sub"], scopes=tuple(payload["scopes"]), exp=payload.get("exp"))
    return claims, "aud" in payload


class TokenVerifier:
    """Verifies ``Authorization`` headers against one HS256 key (spec §3 step 5, §11.3).

    Thread-safe. Keeps a small FIFO cache of recently *verified* tokens (keyed
    by the full token string) so a client's repeated requests skip the HMAC and
    JSON work; ``exp`` is re-checked on every hit and failures are never cached.
    The key may be of any non-empty length here: the length policy is enforced
    by :func:`load_signing_key`, and the spec's test vectors use a 23-byte key.
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
        if leeway_s < 0 or cache_size < 0:
            raise ValueError("leeway_s and cache_size must be >= 0")
        self._key = bytes(key)
        self._leeway = int(leeway_s)
        self._clock = clock
        self._cache_size = cache_size
        self._cache: dict[str, Claims] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"TokenVerifier(leeway_s={self._leeway}, cache_size={self._cache_size})"

    def verify_authorization(self, header: bytes | str | None) -> Claims:
        """The whole of §3 steps 5-6: raise AuthError (401) or return the claims."""
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
                raise AuthError(EXPIRED_MESSAGE, "expired")
            return cached
        try:
            claims = self._verify_uncached(token, now)
        except _Invalid as e:
            raise AuthError(f"Invalid token: {e}", "invalid") from None
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
        # jsonwebtoken splits from the right: extra dots end up in the header part.
        if not token.isascii():
            raise _Invalid("InvalidToken")
        signature, dot, message = _rsplit2(token)
        if not dot:
            raise _Invalid("InvalidToken")
        payload_seg, dot2, header_seg = _rsplit2(message)
        if not dot2:
            raise _Invalid("InvalidToken")
        # 1. Algorithm from the header, before trusting anything else.
        _check_header(header_seg)
        # 2. Signature, compared as canonical base64url text in constant time.
        expected = _sign(self._key, message.encode("ascii"))
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
            raise _Invalid("InvalidSignature")
        # 3. Claims (only now, from an authenticated payload).
        payload, text = _parse_json(_b64decode_strict(payload_seg))
        claims, has_aud = _claims_from_payload(payload, text)
        # 4. Expiry, then audience, in jsonwebtoken's order.
        if self._expired(claims, now):
            raise AuthError(EXPIRED_MESSAGE, "expired")
        if has_aud:
            raise _Invalid("InvalidAudience")
        return claims


def _rsplit2(s: str) -> tuple[str, str, str]:
    """``rsplitn(2, '.')``: (last part, separator, rest); separator empty when there is no dot."""
    rest, dot, last = s.rpartition(".")
    return last, dot, rest
