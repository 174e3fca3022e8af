"""zeusd: a privileged node daemon for GPU and CPU power management and streaming."""

__version__ = "0.4.0"
