"""The CPU side of the runtime: CPUStore holds the middle K/V and LSH tables of a layer.

See magicpig.store.cpu_store for the API and csrc/ for the C++ backend. The names below load on
first use, so that the pure ``magicpig.store.sizes`` (the store's bytes per token, which the
simulator asks) can be imported without torch.
"""

__all__ = ["CPUStore", "AttendHandle", "extension_available"]


def __getattr__(name: str):
    if name in __all__:
        from magicpig.store import cpu_store

        return getattr(cpu_store, name)
    raise AttributeError(f"module 'magicpig.store' has no attribute {name!r}")
