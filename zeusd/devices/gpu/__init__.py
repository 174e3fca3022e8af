"""GPU backends behind one protocol: NVML (real hardware) and a simulator."""
