"""Lab tooling that measures and models the runtime: the cost model, fitting, profiles, the
profiler, the simulator, workloads, serving metrics and the benchmarks (DESIGN.md §5)."""
