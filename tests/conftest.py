"""Test-process settings that must be in place before torch or the extension start.

The thread count is pinned so that the suite's speed and its float summation orders do not
depend on how many cores torch finds or on another process loading one of them: with two
OpenMP threads on a 2-core machine where one core is busy, every parallel region waits on the
slow core (measured: 8-10 minutes for the suite instead of about 2). MAGICPIG_TEST_THREADS
overrides it (e.g. 2, to run the multi-threaded paths); tests of thread-count independence set
their own counts explicitly.
"""

import os

THREADS = os.environ.get("MAGICPIG_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS  # read by libgomp at start-up: the store's default team

import torch  # noqa: E402

torch.set_num_threads(int(THREADS))
