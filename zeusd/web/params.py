"""Query-string parsing and validation shared by every route.

Strict like upstream (serde): unknown, repeated and missing parameters are
errors, booleans are exactly ``true``/``false``, integers are unsigned 32-bit
decimals. Device-id lists are strict too (a junk piece is an error naming it,
where upstream silently dropped it). Every error is a 400 with a JSON body,
raised before anything touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

from zeusd.web.errors import BadRequest

U32_MAX = 0xFFFFFFFF
_SHOWN = 40  # longest piece of client input echoed back in an error


class Kind(Enum):
    BOOL = "bool"
    U32 = "u32"
    TEXT = "text"


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    required: bool = True


def _decode(component: bytes) -> str:
    # x-www-form-urlencoded: '+' is a space, malformed escapes stay literal,
    # invalid UTF-8 is replaced (as serde_urlencoded does).
    if b"%" not in component and b"+" not in component:
        return component.decode("utf-8", "replace")  # the usual case, without unquoting
    return unquote_to_bytes(component.replace(b"+", b" ")).decode("utf-8", "replace")


def split_query(uri: bytes) -> list[tuple[str, str]]:
    """The decoded (key, value) pairs of a request URI's query, in order."""
    _, sep, query = uri.partition(b"?")
    if not sep:
        return []
    pairs = []
    for segment in query.split(b"&"):
        if segment:
            key, _, value = segment.partition(b"=")
            pairs.append((_decode(key), _decode(value)))
    return pairs


def _query_error(detail: str) -> BadRequest:
    return BadRequest(f"Query deserialize error: {detail}")


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def parse_u32(text: str) -> int:
    """Like Rust's ``u32::from_str``: ASCII digits, optional leading '+'."""
    digits = text[1:] if text.startswith("+") else text
    if not digits:
        raise ValueError("cannot parse integer from empty string")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError("invalid digit found in string")
    if len(digits.lstrip("0")) > 10 or int(digits) > U32_MAX:
        raise ValueError("number too large to fit in target type")
    return int(digits)


def _convert(param: Param, value: str) -> Any:
    if param.kind is Kind.BOOL:
        if value == "true":
            return True
        if value == "false":
            return False
        raise _query_error(f"provided string was not `true` or `false` (parameter `{param.name}`)")
    if param.kind is Kind.U32:
        try:
            return parse_u32(value)
        except ValueError as e:
            raise _query_error(f"{e} (parameter `{param.name}`)") from None
    return value


def parse_query(uri: bytes, params: Sequence[Param]) -> dict[str, Any]:
    """Validate a query against an endpoint's parameters; absent optionals are None."""
    allowed = {p.name: p for p in params}
    values: dict[str, Any] = {}
    for key, value in split_query(uri):
        param = allowed.get(key)
        if param is None:
            raise _query_error(f"unknown field `{_shown(key)}`, {_expected(params)}")
        if key in values:
            raise _query_error(f"duplicate field `{key}`")
        values[key] = _convert(param, value)
    for param in params:
        if param.name not in values:
            if param.required:
                raise _query_error(f"missing field `{param.name}`")
            values[param.name] = None
    return values


def _expected(params: Sequence[Param]) -> str:
    if not params:
        return "there are no fields"
    if len(params) == 1:
        return f"expected `{params[0].name}`"
    return "expected one of " + ", ".join(f"`{p.name}`" for p in params)


# Device-id lists -------------------------------------------------------------


def parse_id_list(value: str, kind: str) -> list[int]:
    """``"0, 2,1"`` → ``[0, 2, 1]`` (order and duplicates kept); blank → ``[]``.

    ``kind`` is ``"GPU"`` or ``"CPU"`` and only shapes the messages.
    """
    if not value.strip():
        return []
    ids = []
    for piece in value.split(","):
        piece = piece.strip()
        if not piece:
            raise BadRequest(f"{kind.lower()}_ids contains an empty {kind} index")
        try:
            ids.append(parse_u32(piece))
        except ValueError:
            raise BadRequest(f"Invalid {kind} index: {_shown(piece)}") from None
    return ids


def require_existing(value: str | None, kind: str, available: Iterable[int]) -> list[int]:
    """Ids for endpoints that act on devices: absent means all, none is an error,
    and the first id that does not exist fails the request before any effect."""
    known = set(available)
    if value is None:
        return sorted(known)
    ids = parse_id_list(value, kind)
    if not ids:
        raise BadRequest(f"{kind.lower()}_ids must contain at least one {kind} index")
    for i in ids:
        if i not in known:
            raise BadRequest(f"{kind} index {i} does not exist.")
    return ids


def select_known(value: str | None, kind: str, available: Iterable[int]) -> list[int]:
    """Ids for power readings and streams: absent means all, an empty list
    means an empty answer, and every unknown id is named in one error."""
    known = sorted(set(available))
    if value is None:
        return known
    ids = parse_id_list(value, kind)
    known_set = set(known)
    unknown = [i for i in ids if i not in known_set]
    if unknown:
        shown = ", ".join(map(str, unknown[:16])) + (", ..." if len(unknown) > 16 else "")
        raise BadRequest(
            f"Unknown {kind} indices: [{shown}]. Available: {{{', '.join(map(str, known))}}}"
        )
    return sorted(set(ids))


def id_map(values: Mapping[int, Any]) -> dict[str, Any]:
    """A device map with decimal-string keys in ascending id order."""
    return {str(i): values[i] for i in sorted(values)}
