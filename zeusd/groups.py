"""API groups: the unit of enabling endpoints and of token scopes."""

from __future__ import annotations

import enum


class ApiGroup(str, enum.Enum):
    GPU_CONTROL = "gpu-control"
    GPU_READ = "gpu-read"
    CPU_READ = "cpu-read"
    #: ``GET /metrics`` (Prometheus): covers the devices the enabled read groups opened.
    METRICS = "metrics"

    @property
    def needs_root(self) -> bool:
        """Groups whose devices only root may touch (NVML writes, RAPL energy files)."""
        return self in (ApiGroup.GPU_CONTROL, ApiGroup.CPU_READ)


#: Default for ``--enable``: upstream's three, in upstream's order, then ours.
DEFAULT_GROUPS: tuple[ApiGroup, ...] = (ApiGroup.GPU_CONTROL, ApiGroup.GPU_READ, ApiGroup.CPU_READ, ApiGroup.METRICS)

#: The live power page (zeusd/web/live_page.py): static, so served without a token, but only with gpu-read.
LIVE_PAGE_PATHS: frozenset[str] = frozenset(("/", "/ui"))

#: Scope names a token may carry (the group names).
SCOPE_NAMES: frozenset[str] = frozenset(g.value for g in ApiGroup)


def group_for_path(path: str) -> ApiGroup | None:
    """The group a decoded request path belongs to (None: no group, e.g. /discover)."""
    if path.startswith("/gpu/"):
        if path.startswith("/gpu/set_") or path.startswith("/gpu/reset_"):
            return ApiGroup.GPU_CONTROL
        return ApiGroup.GPU_READ
    if path.startswith("/cpu/"):
        return ApiGroup.CPU_READ
    if path == "/metrics":
        return ApiGroup.METRICS
    if path in LIVE_PAGE_PATHS:
        return ApiGroup.GPU_READ
    return None
