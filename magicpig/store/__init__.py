"""The CPU side of the runtime: CPUStore holds the middle K/V and LSH tables of a layer.

See magicpig.store.cpu_store for the API and csrc/ for the C++ backend.
"""

from magicpig.store.cpu_store import AttendHandle, CPUStore, extension_available

__all__ = ["CPUStore", "AttendHandle", "extension_available"]
