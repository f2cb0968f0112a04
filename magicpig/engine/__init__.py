"""The engine: continuous batching (schedule -> run -> update), outputs, lanes."""
