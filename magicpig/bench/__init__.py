"""The HTTP load generator (`magicpig bench serve`): an OpenAI-compatible client that replays a
workload against a server and reports serving metrics (magicpig.perf.metrics)."""
