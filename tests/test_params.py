"""Query-string parsing and device-id validation (zeusd/web/params.py), in process: the exact
answers and refusals every route relies on, at their boundaries. The same rules over HTTP are
tested in test_api_simulated.py and test_hostile_input.py."""

from __future__ import annotations

import re

import pytest

from zeusd.web.errors import BadRequest
from zeusd.web.params import (
    U32_MAX,
    Kind,
    Param,
    id_map,
    parse_id_list,
    parse_query,
    parse_u32,
    require_existing,
    select_known,
    split_query,
)

GPU_IDS = Param("gpu_ids", Kind.TEXT, required=False)
LIMIT = Param("power_limit_mw", Kind.U32)
BLOCK = Param("block", Kind.BOOL)


def refusal(call: object, *args: object) -> str:
    """The message of the BadRequest (status 400) that ``call(*args)`` raises."""
    assert callable(call)
    with pytest.raises(BadRequest) as caught:
        call(*args)
    assert caught.value.status == 400
    return str(caught.value.message)


# --------------------------------------------------------------------------- split_query


def test_split_query_decodes_form_encoding_in_order() -> None:
    assert split_query(b"/x") == []
    assert split_query(b"/x?") == []
    assert split_query(b"/x?a=1&&b=&c") == [("a", "1"), ("b", ""), ("c", "")]
    assert split_query(b"/x?gpu%5Fids=0%2C1&n=a+b") == [("gpu_ids", "0,1"), ("n", "a b")]
    assert split_query(b"/x?k=%zz%4") == [("k", "%zz%4")]  # malformed escapes stay literal
    assert split_query(b"/x?k=%ff") == [("k", "\ufffd")]  # invalid UTF-8 is replaced
    assert split_query(b"/x?k=a=b") == [("k", "a=b")]  # only the first '=' splits
    assert split_query(b"/x?k=a?b") == [("k", "a?b")]  # only the first '?' starts the query


# --------------------------------------------------------------------------- parse_u32


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("7", 7), ("+300000", 300_000), ("0004294967295", U32_MAX), ("4294967295", 4_294_967_295),
     ("00000000000000000001", 1)],
)
def test_parse_u32_accepts_rusts_syntax(text: str, value: int) -> None:
    assert parse_u32(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "cannot parse integer from empty string"), ("+", "cannot parse integer from empty string"),
     ("-1", "invalid digit found in string"), ("1.5", "invalid digit found in string"),
     (" 1", "invalid digit found in string"), ("١", "invalid digit found in string"), ("++1", "invalid digit found in string"),
     ("4294967296", "number too large to fit in target type"),
     ("99999999999999999999", "number too large to fit in target type")],
)
def test_parse_u32_refuses_like_rust(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_u32(text)


# --------------------------------------------------------------------------- parse_query


def test_parse_query_converts_and_fills_absent_optionals() -> None:
    params = [GPU_IDS, LIMIT, BLOCK]
    assert parse_query(b"/p?power_limit_mw=%2B250000&block=true", params) == {
        "power_limit_mw": 250_000, "block": True, "gpu_ids": None,
    }
    assert parse_query(b"/p?block=false&gpu_ids=1,2&power_limit_mw=0", params) == {
        "block": False, "gpu_ids": "1,2", "power_limit_mw": 0,
    }
    assert parse_query(b"/p", [GPU_IDS]) == {"gpu_ids": None}
    assert parse_query(b"/p", []) == {}


@pytest.mark.parametrize(
    ("uri", "params", "message"),
    [
        (b"/p?block=yes", [BLOCK], "provided string was not `true` or `false` (parameter `block`)"),
        (b"/p?block=True", [BLOCK], "provided string was not `true` or `false` (parameter `block`)"),
        (b"/p?block=", [BLOCK], "provided string was not `true` or `false` (parameter `block`)"),
        (b"/p?power_limit_mw=-5", [LIMIT], "invalid digit found in string (parameter `power_limit_mw`)"),
        (b"/p?power_limit_mw=4294967296", [LIMIT], "number too large to fit in target type (parameter `power_limit_mw`)"),
        (b"/p?power_limit_mw=", [LIMIT], "cannot parse integer from empty string (parameter `power_limit_mw`)"),
        (b"/p?block=true&block=true", [BLOCK], "duplicate field `block`"),
        (b"/p?block=true", [BLOCK, LIMIT], "missing field `power_limit_mw`"),
        (b"/p?x=1", [], "unknown field `x`, there are no fields"),
        (b"/p?x=1", [BLOCK], "unknown field `x`, expected `block`"),
        (b"/p?x=1", [GPU_IDS, BLOCK, LIMIT], "unknown field `x`, expected one of `gpu_ids`, `block`, `power_limit_mw`"),
        (b"/p?" + b"k" * 41 + b"=1", [BLOCK], f"unknown field `{'k' * 40}...`, expected `block`"),
        (b"/p?" + b"k" * 40 + b"=1", [BLOCK], f"unknown field `{'k' * 40}`, expected `block`"),
    ],
)
def test_parse_query_refusals(uri: bytes, params: list[Param], message: str) -> None:
    assert refusal(parse_query, uri, params) == f"Query deserialize error: {message}"


# --------------------------------------------------------------------------- device ids


def test_parse_id_list_keeps_order_and_duplicates() -> None:
    assert parse_id_list("", "GPU") == [] and parse_id_list("  ", "GPU") == []
    assert parse_id_list("0, 2,1", "GPU") == [0, 2, 1]
    assert parse_id_list("3,3", "CPU") == [3, 3]
    assert parse_id_list("+1", "GPU") == [1]


@pytest.mark.parametrize(
    ("value", "kind", "message"),
    [("0,,1", "GPU", "gpu_ids contains an empty GPU index"), ("1,", "CPU", "cpu_ids contains an empty CPU index"),
     ("0,x", "GPU", "Invalid GPU index: x"), ("-1", "CPU", "Invalid CPU index: -1"),
     ("9" * 50, "GPU", f"Invalid GPU index: {'9' * 40}..."), ("4294967296", "GPU", "Invalid GPU index: 4294967296")],
)
def test_parse_id_list_refusals(value: str, kind: str, message: str) -> None:
    assert refusal(parse_id_list, value, kind) == message


def test_require_existing_for_control_and_counters() -> None:
    assert require_existing(None, "GPU", [3, 1, 2]) == [1, 2, 3]  # absent: every device, in order
    assert require_existing("2,1,2", "GPU", range(4)) == [2, 1, 2]  # as given
    assert refusal(require_existing, "", "GPU", range(4)) == "gpu_ids must contain at least one GPU index"
    assert refusal(require_existing, "1,4,5", "GPU", range(4)) == "GPU index 4 does not exist."  # the first one
    assert refusal(require_existing, "0", "CPU", []) == "CPU index 0 does not exist."
    assert refusal(require_existing, "0,,1", "GPU", range(4)) == "gpu_ids contains an empty GPU index"


def test_select_known_for_readings_and_streams() -> None:
    assert select_known(None, "GPU", [2, 0, 1, 0]) == [0, 1, 2]
    assert select_known("", "GPU", range(4)) == []  # an empty list is an empty answer
    assert select_known("3,1,3", "GPU", range(4)) == [1, 3]  # sorted, once each
    assert refusal(select_known, "1,7,9", "CPU", [0, 1]) == "Unknown CPU indices: [7, 9]. Available: {0, 1}"
    many = ",".join(str(i) for i in range(10, 30))
    shown = ", ".join(str(i) for i in range(10, 26))
    assert refusal(select_known, many, "GPU", range(4)) == f"Unknown GPU indices: [{shown}, ...]. Available: {{0, 1, 2, 3}}"
    sixteen = ",".join(str(i) for i in range(10, 26))
    assert refusal(select_known, sixteen, "GPU", [0]) == f"Unknown GPU indices: [{shown}]. Available: {{0}}"
    seventeen = ",".join(str(i) for i in range(10, 27))
    assert refusal(select_known, seventeen, "GPU", [0]) == f"Unknown GPU indices: [{shown}, ...]. Available: {{0}}"
    assert refusal(select_known, "1,x", "CPU", [0, 1]) == "Invalid CPU index: x"


def test_id_map_has_decimal_keys_in_ascending_order() -> None:
    assert list(id_map({10: "a", 2: "b", 0: "c"}).items()) == [("0", "c"), ("2", "b"), ("10", "a")]
    assert id_map({}) == {}
