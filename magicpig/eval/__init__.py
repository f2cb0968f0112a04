"""Evaluation: RULER and LongBench runners, metrics, and the (K, L)-for-a-budget helper."""
