"""gpuschedd: run GPU models as systemd units and freeze or thaw them on request."""

__version__ = "0.1.0"
