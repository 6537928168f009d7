"""Self-hosted GitHub Actions runner orchestrator for spot GPU VMs."""

__version__ = "0.1.0"
