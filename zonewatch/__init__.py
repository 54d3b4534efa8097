"""zonewatch: watch VM-isolated workloads ("zones") from the host, with nothing in the guest."""

__version__ = "0.1.0"
