"""Runtime conformance of a device backend to the Protocol it is typed as.

mypy checks the annotated assignments in the backend tests statically (``tests/``
is type-checked); this checks the same members at run time on the real object, so
a member renamed, dropped or given other parameters fails a test run as well.
"""

from __future__ import annotations

import inspect
from typing import Any


def protocol_members(protocol: type) -> dict[str, Any]:
    """The public members a Protocol declares: name -> property or function."""
    return {
        name: member
        for klass in reversed(protocol.__mro__)
        if klass is not object and getattr(klass, "_is_protocol", False)
        for name, member in vars(klass).items()
        if not name.startswith("_")
    }


def assert_conforms(obj: object, protocol: type) -> None:
    """Every property of ``protocol`` is readable on ``obj``; every method exists with the same parameters."""
    members = protocol_members(protocol)
    assert members, f"{protocol.__name__} declares no members"
    for name, member in members.items():
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {protocol.__name__}.{name}"
        if isinstance(member, property):
            assert not inspect.ismethod(getattr(obj, name)), f"{type(obj).__name__}.{name} is a method, not a value"
            continue
        implemented = getattr(obj, name)
        assert callable(implemented), f"{type(obj).__name__}.{name} is not callable"
        declared = list(inspect.signature(member).parameters)[1:]  # without self
        assert list(inspect.signature(implemented).parameters) == declared, (name, declared)
