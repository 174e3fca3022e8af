"""Which GPU backend serves the node: ``--gpu-backend auto|nvml|amdsmi`` (and the simulator).

``auto`` probes both vendors' libraries: it serves the one that finds GPUs,
refuses to start when both do (a node is served by one backend), and serves
zero GPUs when neither does. An explicit backend that cannot be loaded stops
startup with the reason. Each library is imported only when it is probed.
"""

from __future__ import annotations

from typing import Sequence

from twisted.logger import Logger

from zeusd.devices.gpu.base import GPU, GPUBackend
from zeusd.errors import StartupError

log = Logger()

GPU_BACKENDS = ("auto", "nvml", "amdsmi")


class NoGpus:
    """A node without GPUs, saying why for the startup error when GPUs were required."""

    def __init__(self, absence: str) -> None:
        self._absence = absence

    @property
    def gpus(self) -> Sequence[GPU]:
        return ()

    @property
    def absence(self) -> str:
        return self._absence

    def close(self) -> None:
        pass


def open_gpu_backend(choice: str) -> GPUBackend:
    """Open the backend ``choice`` names (blocking: library init and device probes)."""
    if choice == "nvml":
        return _open_nvml(required=True)
    if choice == "amdsmi":
        amd, _ = _open_amdsmi(required=True)
        assert amd is not None
        return amd
    try:
        nvidia = _open_nvml(required=False)
    except StartupError as nvml_failure:
        # A libnvidia-ml without a working NVIDIA driver (CUDA installed on an AMD node):
        # fatal only if there is no AMD GPU to serve either.
        amd, _ = _open_amdsmi(required=False)
        if amd is None or not amd.gpus:
            if amd is not None:
                amd.close()
            raise
        log.warn("NVML failed ({error}); serving the AMD GPUs", error=str(nvml_failure))
        return amd
    amd, amd_absence = _open_amdsmi(required=False)
    if amd is not None and amd.gpus and nvidia.gpus:
        counts = f"{len(nvidia.gpus)} NVIDIA and {len(amd.gpus)} AMD"
        nvidia.close()
        amd.close()
        raise StartupError(
            f"--gpu-backend auto found {counts} GPUs; one backend serves a node: choose --gpu-backend nvml or amdsmi"
        )
    if amd is not None and amd.gpus:
        nvidia.close()
        return amd
    if amd is not None:
        amd_absence = amd.absence
        amd.close()
    if nvidia.gpus:
        return nvidia
    why = f"no NVIDIA GPU ({nvidia.absence}) and no AMD GPU ({amd_absence})"
    nvidia.close()
    return NoGpus(why)


def _open_nvml(required: bool) -> GPUBackend:
    from zeusd.devices.gpu.nvml import open_nvml_backend

    backend = open_nvml_backend()
    if required and not backend.library_loaded:
        raise StartupError(f"--gpu-backend nvml: {backend.absence}")
    return backend


def _open_amdsmi(required: bool) -> tuple[GPUBackend | None, str]:
    """The AMD backend, or (auto) None and why AMD SMI is not there at all."""
    from zeusd.devices.gpu.amdsmi import AmdSmiUnavailable, open_amdsmi_backend

    try:
        return open_amdsmi_backend(), ""
    except AmdSmiUnavailable as e:
        if required:
            raise StartupError(f"--gpu-backend amdsmi: {e}") from None
        log.debug("No AMD SMI: {why}", why=str(e))
        return None, str(e)
