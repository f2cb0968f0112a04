"""Issue 13 point 7: MagicPIG's CPU-resident middle K/V against all K/V on the GPU, simulated.

Llama-3.1-8B on one H100 SXM (80 GiB) with its DGX host (2 x 56-core Xeon 8480+, the shipped
profile's 300 GB/s achievable by the store's random row gathers), long prompts (32k-96k
tokens). Two parts, both with the repository's simulator (the real scheduler, the cost model's
step times, ``magicpig.perf.simulator.simulate``):

(a) four configurations -- ``chunked`` / dense, ``nexus`` / dense (all K/V in HBM, batch
    limited by HBM), ``chunked`` / magicpig, ``nexus`` / magicpig (2 dense layers on the GPU,
    the other 30 layers' middle K/V in the host's store) -- at prompt means 32k, 64k, 96k with
    256 output tokens: the highest request rate at which >= 90% of the requests meet the SLO,
    and the largest number of concurrent sequences (what memory holds, and what memory holds
    with a full-device decode step still within the TPOT SLO).
(b) the crossover map: prompt {32k, 64k, 96k} x output {128, 512, 2048} x host bandwidth
    {100, 200, 300, 400} GB/s: (best policy's highest rate, magicpig) / (best policy's, dense).

Assumptions (also written into the JSON's "assumptions"):

* Host-bandwidth variant of the profile at B bytes/s: ``host_memory_bandwidth = B``; the
  store's ``row_s`` and ``append_s`` (both priced as bytes / host bandwidth in
  ``cost_model._gpu_store``) multiplied by 300e9 / B; ``call_s`` (50 us), ``entry_s`` (core
  time of the bucket walk), threads, the PCIe link (40 GB/s) and everything on the device kept.
* Requests: prompt lengths lognormal around the stated mean (sigma of the log 0.25, mean-
  preserving, clipped to [mean / 2, min(1.5 x mean, 131072 - output)]); outputs fixed; the same
  lengths (seeded) at every rate; Poisson arrivals (``bench.arrival_times``, the same draws
  scaled by 1 / rate).
* SLO: TTFT <= 30 s and TPOT <= 100 ms; a rate is within the SLO when >= 90% of the requests
  meet both. Rate search: from a start below the prefill capacity, x1.5 up until a rate fails
  (or down until one passes), then bisection on the log of the rate.
* Memory: 80 GiB HBM (weights 15 GiB); host store budget 1,536 GiB (a DGX H100 has 2 TB).
  ``max_num_seqs`` 256; 256-token blocks. chunked: 2,048-token budget; nexus: 2,048-token chunks,
  decode target = TPOT SLO, slack 0.9. magicpig: 2 dense layers, sinks 4 + window 64, K=10,
  L=150, sampled fraction 0.02 (the cost model's defaults).

Usage::

    python scripts/study_crossover.py --json study.json --plot docs/study_crossover.png
    python scripts/study_crossover.py --quick
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from magicpig.perf.crossover import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the study's results here")
    ap.add_argument("--plot", metavar="PATH.png", help="bar charts of (a) and heat maps of (b) here")
    ap.add_argument("--quick", action="store_true", help="a smaller grid and fewer requests (~2 min)")
    ap.add_argument("--num-requests", type=int, help="requests per run (default 48; --quick 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-json", metavar="PATH", help="print and plot a saved --json result instead of running")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
