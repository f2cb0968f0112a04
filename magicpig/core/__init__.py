"""Pure request state and policy (no torch): one Request, the ledger of device blocks, slots
and CPU-store bytes, the scheduler and its policies (DESIGN.md §5)."""
