"""Startup errors: found early, reported as one ``Error:`` line, whatever runs the daemon.

:func:`preflight` finds what would stop the daemon without starting
anything: it runs in every entry point before the service tree is built, which
under ``twistd`` is before the fork, while stderr still reaches the terminal.
What can only fail while starting (a device, a bind race) is reported by
:func:`fail_startup` from inside the service tree.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn, Sequence

from twisted.logger import Logger

from zeusd.devices.gpu.control import OPERATIONS
from zeusd.errors import StartupError
from zeusd.groups import ApiGroup
from zeusd.listeners import check_listener
from zeusd.options import ServeConfig

log = Logger()


def check_privileges(config: ServeConfig, overridden: Sequence[str] = ()) -> None:
    """Groups that touch root-only device files need euid 0 (not in simulation).

    gpu-control with at least one overridden operation does not: the
    operator's commands carry the privilege. The other operations still go to
    the GPU library, which refuses them without root.
    """
    if config.simulate or os.geteuid() == 0:
        return
    for group in config.enabled_groups:
        if group is ApiGroup.GPU_CONTROL and overridden:
            native = [op.name for op in OPERATIONS if op.name not in overridden]
            if native:
                log.warn(
                    "gpu-control runs without root for its overridden operations; {native} still use the "
                    "GPU library, which needs root: they will fail with a permission error",
                    native=", ".join(native),
                )
            continue
        if group.needs_root:
            raise StartupError(
                f"API group '{group.value}' requires root but zeusd is not running as root "
                f"(run as root, drop the group with --enable, or use --simulate)"
            )


def check_gpu_command_overrides(config: ServeConfig) -> list[str]:
    """Load the override file (its errors stop startup here); the overridden operations."""
    if config.gpu_command_overrides is None:
        return []
    if not config.enabled(ApiGroup.GPU_CONTROL):
        log.warn(
            "--gpu-command-overrides {path} is ignored: the gpu-control API group is not enabled",
            path=config.gpu_command_overrides,
        )
        return []
    from zeusd.devices.gpu.overrides import load_overrides

    return list(load_overrides(config.gpu_command_overrides))


def preflight(config: ServeConfig) -> None:
    """Raise StartupError for anything that would stop startup; open and start nothing."""
    check_privileges(config, check_gpu_command_overrides(config))
    if config.signing_key_path is not None:
        from zeusd.auth import load_signing_key

        load_signing_key(config.signing_key_path)
    if config.rapl_root is not None and config.enabled(ApiGroup.CPU_READ) and not config.simulate:
        if not os.path.isdir(config.rapl_root):
            raise StartupError(f"--rapl-root {config.rapl_root}: no such directory")
    for spec in config.listeners:
        check_listener(spec)


def print_error(error: StartupError) -> None:
    """``Error: <message>`` on the process's real stderr (runners may have redirected sys.stderr)."""
    stream = sys.__stderr__ or sys.stderr
    print(f"Error: {error}", file=stream, flush=True)


def fail_startup(error: StartupError) -> NoReturn:
    """Stop the process for a startup error: one ``Error:`` line and exit status 1.

    A daemonized ``twistd`` child has no terminal (its stderr is /dev/null):
    there the error is raised on, so that ``twistd`` reports it to the waiting
    parent through its status pipe, and the parent exits non-zero.
    """
    log.error("Error: {error}", error=str(error))
    if _stderr_is_void():
        raise error
    print_error(error)
    raise SystemExit(1)


def _stderr_is_void() -> bool:
    try:
        return os.path.samestat(os.fstat(2), os.stat(os.devnull))
    except OSError:
        return True


def raise_fd_limit(wanted: int = 65536) -> None:
    """Every stream subscriber is a file descriptor: lift the soft limit toward the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("Raised the open-file limit from {soft} to {target}", soft=soft, target=target)
