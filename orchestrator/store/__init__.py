from orchestrator.store.store import Store

__all__ = ["Store"]
