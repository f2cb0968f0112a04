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
  ``gpus._gpu_store``) multiplied by 300e9 / B; ``call_s`` (50 us), ``entry_s`` (core
  time of the bucket walk), threads, the PCIe link (40 GB/s) and everything on the device kept.
* Requests: prompt lengths lognormal around the stated mean (sigma of the log 0.25, mean-
  preserving, clipped to [mean / 2, min(1.5 x mean, 131072 - output)]); outputs fixed; the same
  lengths (seeded) at every rate; Poisson arrivals (``workloads.arrival_times``, the same draws
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
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from magicpig.perf.workloads import arrival_times
from magicpig.perf.cost_model import CostModel
from magicpig.perf.gpus import build_gpu_profile
from magicpig.perf.profile import DeviceProfile
from magicpig.core.kv_budget import blocks_for
from magicpig.core.policies import PolicyConfig
from magicpig.perf.simulator import TraceItem, memory_layout, simulate

MAX_CONTEXT = 131072
BASE_HOST_BW = 300e9  # the shipped profile's achievable host bandwidth for the store
POLICIES = ("chunked", "nexus")
METHODS = ("dense", "magicpig")
CONFIGS = tuple((p, m) for m in METHODS for p in POLICIES)


def bandwidth_profile(base: DeviceProfile, bandwidth: float) -> DeviceProfile:
    """``base`` with a host of ``bandwidth`` bytes/s: host_memory_bandwidth set, the store's
    per-row and per-append costs (bytes / host bandwidth) scaled by old / new bandwidth; call
    and entry costs, threads and the link kept."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth={bandwidth}: expected > 0 bytes/s")
    k = base.host_memory_bandwidth / bandwidth
    store = replace(base.store, row_s=base.store.row_s * k, append_s=base.store.append_s * k)
    return replace(base, host_memory_bandwidth=float(bandwidth), store=store,
                   name=f"{base.name}_host{bandwidth / 1e9:g}GBs")


def cost_model(bandwidth: float = BASE_HOST_BW, base: Optional[DeviceProfile] = None) -> CostModel:
    base = base or build_gpu_profile("h100")
    prof = bandwidth_profile(base, bandwidth)
    return CostModel(prof, prof.model)


def lengths(prompt_mean: int, output: int, n: int, seed: int = 0, sigma: float = 0.25) -> list[tuple[int, int]]:
    """``n`` (prompt, output) pairs: prompts lognormal around ``prompt_mean`` (module docstring)."""
    rng = np.random.default_rng([seed, 7, prompt_mean])
    raw = rng.lognormal(math.log(prompt_mean) - sigma**2 / 2.0, sigma, size=n) if sigma > 0 else np.full(n, prompt_mean)
    hi = min(int(1.5 * prompt_mean), MAX_CONTEXT - output)
    return [(int(np.clip(np.rint(p), prompt_mean // 2, hi)), int(output)) for p in raw]


def trace(lens: Sequence[tuple[int, int]], rate: float, seed: int = 0) -> list[TraceItem]:
    return [TraceItem(p, o, a) for (p, o), a in zip(lens, arrival_times(len(lens), rate, 1.0, seed))]


def prefill_seconds(cost: CostModel, prompt: int, method: str) -> float:
    """One prompt's prefill alone on the whole device, in 2,048-token chunks."""
    return sum(cost.prefill_time(min(2048, prompt - c), c, 1.0, method) for c in range(0, prompt, 2048))


class Study:
    """The fixed settings of every run (module docstring) and the runs themselves."""

    def __init__(self, num_requests: int = 48, slo_ttft_s: float = 30.0, slo_tpot_s: float = 0.1,
                 good_fraction: float = 0.9, device_memory_gb: float = 80.0, host_memory_gb: float = 1536.0,
                 max_num_seqs: int = 256, bisect_steps: int = 3, seed: int = 0):
        self.num_requests, self.slo_ttft_s, self.slo_tpot_s = num_requests, slo_ttft_s, slo_tpot_s
        self.good_fraction, self.device_memory_gb, self.host_memory_gb = good_fraction, device_memory_gb, host_memory_gb
        self.max_num_seqs, self.bisect_steps, self.seed = max_num_seqs, bisect_steps, seed
        self.sims = 0

    def run(self, cost: CostModel, lens, rate: float, policy: str, method: str) -> dict[str, Any]:
        pol = PolicyConfig(policy, token_budget=2048, chunk_tokens=2048, tbt_target_s=self.slo_tpot_s, method=method)
        res = simulate(trace(lens, rate, self.seed), cost, pol, method, self.max_num_seqs,
                       device_memory_gb=self.device_memory_gb, host_memory_gb=self.host_memory_gb,
                       slo_ttft_s=self.slo_ttft_s, slo_tbt_s=self.slo_tpot_s)
        self.sims += 1
        m = res.metrics
        keys = ("good_fraction", "goodput", "request_throughput", "output_throughput", "p95_ttft_ms",
                "mean_tpot_ms", "p95_tpot_ms", "peak_running", "preemptions")
        return {"rate": rate, **{k: m[k] for k in keys}}

    def requests_for(self, cost: CostModel, prompt: int) -> int:
        """Requests per run for prompts of ``prompt`` tokens: at least ``num_requests`` and
        enough that a burst of them all at once breaks the TTFT SLO (3 x TTFT SLO / one
        prompt's prefill time): with fewer, a short trace passes at any rate, as its backlog
        never outgrows the SLO."""
        return max(self.num_requests, math.ceil(3 * self.slo_ttft_s / prefill_seconds(cost, prompt, "dense")))

    def ok(self, run: dict[str, Any]) -> bool:
        return run["good_fraction"] >= self.good_fraction

    def highest_rate(self, cost: CostModel, lens, policy: str, method: str) -> dict[str, Any]:
        """The highest rate (req/s) within the SLO: x1.5 steps from a start at half the
        prefill capacity, then ``bisect_steps`` bisections on log rate. Returns the passing run
        (rate 0 and None when even the lowest tried rate fails) and every run tried."""
        prefill = prefill_seconds(cost, int(sum(p for p, _ in lens) / len(lens)), method)
        rate, runs = 0.5 / prefill, []
        lo = hi = None
        for _ in range(24):  # grow or shrink until a bracket [pass, fail] is found
            r = self.run(cost, lens, rate, policy, method)
            runs.append(r)
            if self.ok(r):
                lo = r
                if hi is not None:
                    break
                rate *= 1.5
            else:
                hi = r
                if lo is not None:
                    break
                rate /= 1.5
                if rate < 1e-3:
                    break
        if lo is not None and hi is not None:
            for _ in range(self.bisect_steps):
                r = self.run(cost, lens, math.sqrt(lo["rate"] * hi["rate"]), policy, method)
                runs.append(r)
                lo, hi = (r, hi) if self.ok(r) else (lo, r)
        best = lo or {"rate": 0.0}
        return {"rate": best["rate"], "at_rate": lo, "first_fail": hi["rate"] if hi else None, "runs": len(runs)}

    def concurrency(self, cost: CostModel, method: str, prompt: int, output: int) -> dict[str, Any]:
        """Most sequences of ``prompt`` + ``output`` tokens the memory holds (device blocks and
        slots; magicpig also the host store) and, of those, most whose full-device decode step
        at mid-output context stays within the TPOT SLO."""
        tokens = prompt + output - 1

        def fits(n: int) -> bool:
            try:
                L = memory_layout(cost, method, n, 256, self.device_memory_gb, self.host_memory_gb)
            except ValueError:
                return False
            dev = n * blocks_for(tokens, L.block_size) <= L.total_blocks if L.block_size else True
            return dev and n * L.cpu_bytes_per_token * tokens <= L.cpu_bytes_total

        n = 0
        while fits(n + 1) and n < 4096:
            n += 1
        ctx = prompt + output // 2
        fast = 0
        while fast < n and cost.decode_time([ctx] * (fast + 1), method, 1.0) <= self.slo_tpot_s:
            fast += 1
        step = cost.decode_time([ctx] * n, method, 1.0) if n else None
        return {"memory": n, "within_tpot": fast, "step_ms_at_memory": step * 1e3 if step else None}


def part_a(study: Study, base: DeviceProfile, prompts: Sequence[int], output: int, log=print) -> list[dict[str, Any]]:
    cost = cost_model(BASE_HOST_BW, base)
    rows = []
    for prompt in prompts:
        lens = lengths(prompt, output, study.requests_for(cost, prompt), study.seed)
        for policy, method in CONFIGS:
            hr = study.highest_rate(cost, lens, policy, method)
            conc = study.concurrency(cost, method, prompt, output)
            row = {"prompt": prompt, "output": output, "requests": len(lens), "policy": policy, "method": method, **hr, "concurrency": conc}
            rows.append(row)
            at = hr["at_rate"] or {}
            log(f"  (a) prompt {prompt:>6} {policy:>7}/{method:<8} rate {hr['rate']:.3f} req/s "
                f"(peak running {at.get('peak_running')}, mean TPOT {at.get('mean_tpot_ms') or 0:.0f} ms, "
                f"p95 TTFT {(at.get('p95_ttft_ms') or 0) / 1e3:.1f} s); memory holds {conc['memory']}, "
                f"within TPOT {conc['within_tpot']}")
    return rows


def part_b(study: Study, base: DeviceProfile, prompts: Sequence[int], outputs: Sequence[int],
           bandwidths_gbs: Sequence[float], log=print) -> list[dict[str, Any]]:
    dense_cost = cost_model(BASE_HOST_BW, base)  # dense never touches the host store
    cells = []
    for prompt in prompts:
        for output in outputs:
            lens = lengths(prompt, output, study.requests_for(dense_cost, prompt), study.seed)
            dense = {p: study.highest_rate(dense_cost, lens, p, "dense")["rate"] for p in POLICIES}
            d_pol = max(POLICIES, key=lambda p: dense[p])
            for bw in bandwidths_gbs:
                cost = cost_model(bw * 1e9, base)
                mp = {p: study.highest_rate(cost, lens, p, "magicpig")["rate"] for p in POLICIES}
                m_pol = max(POLICIES, key=lambda p: mp[p])
                ratio = mp[m_pol] / dense[d_pol] if dense[d_pol] > 0 else (math.inf if mp[m_pol] > 0 else None)
                cell = {"prompt": prompt, "output": output, "requests": len(lens), "host_bw_gbs": bw, "dense_rates": dense,
                        "magicpig_rates": mp, "dense_best": [d_pol, dense[d_pol]], "magicpig_best": [m_pol, mp[m_pol]],
                        "ratio": ratio}
                cells.append(cell)
                log(f"  (b) prompt {prompt:>6} output {output:>5} host {bw:>4g} GB/s: magicpig {mp[m_pol]:.3f} "
                    f"({m_pol}) / dense {dense[d_pol]:.3f} ({d_pol}) = {ratio if ratio is None else round(ratio, 2)}")
    return cells


def run_study(prompts=(32768, 65536, 98304), output_a: int = 256, outputs=(128, 512, 2048),
              bandwidths_gbs=(100, 200, 300, 400), num_requests: int = 48, bisect_steps: int = 3,
              skip_a: bool = False, log=print, **study_kw) -> dict[str, Any]:
    """The whole study (module docstring) as a JSON-ready dict."""
    t0 = time.time()
    base = build_gpu_profile("h100")
    study = Study(num_requests=num_requests, bisect_steps=bisect_steps, **study_kw)
    a = [] if skip_a else part_a(study, base, prompts, output_a, log)
    b = part_b(study, base, prompts, outputs, bandwidths_gbs, log)
    return {
        "assumptions": {
            "device": "H100 SXM 80 GiB, profile h100_llama31_8b (build_gpu_profile('h100'))",
            "host": f"{base.host_cores} cores (2 x 56-core Xeon 8480+), store bandwidth {BASE_HOST_BW / 1e9:g} GB/s "
                    "achievable (614 GB/s peak DDR5-4800 x 16), PCIe Gen5 40 GB/s",
            "bandwidth_variant": "host_memory_bandwidth = B; store.row_s and store.append_s x (300e9 / B); "
                                 "call_s, entry_s, threads, link kept",
            "store_base": {"call_s": base.store.call_s, "row_s": base.store.row_s, "entry_s": base.store.entry_s,
                           "append_s": base.store.append_s, "threads": base.store.threads},
            "requests": f"max({num_requests}, 3 x TTFT SLO / one prompt's dense prefill) per run; prompts lognormal sigma 0.25 around the mean, clipped to "
                        "[mean/2, min(1.5 mean, 131072 - output)]; outputs fixed; Poisson arrivals",
            "slo": {"ttft_s": study.slo_ttft_s, "tpot_s": study.slo_tpot_s, "good_fraction": study.good_fraction},
            "memory": {"device_gib": study.device_memory_gb, "host_store_gib": study.host_memory_gb,
                       "max_num_seqs": study.max_num_seqs, "block_size": 256},
            "policies": "chunked token_budget 2048; nexus chunk 2048, tbt target 0.1 s, slack 0.9",
            "rate_search": f"x1.5 bracket from 0.5 / (one prompt's prefill time), then {bisect_steps} bisections "
                           "on log rate",
        },
        "prefill_s": {str(p): prefill_seconds(CostModel(base, base.model), p, "dense") for p in prompts},
        "part_a": a, "crossover": b, "simulations": study.sims, "runtime_s": round(time.time() - t0, 1),
    }


# ----------------------------------------------------------------------------- output
def _k(n: int) -> str:
    return f"{n // 1024}k"


def tables(doc: dict[str, Any]) -> str:
    out = []
    if doc["part_a"]:
        out.append("(a) highest rate within SLO (req/s) / concurrent sequences memory holds "
                   "(within TPOT at full device)")
        prompts = sorted({r["prompt"] for r in doc["part_a"]})
        out.append("| policy / method | " + " | ".join(f"{_k(p)} rate | {_k(p)} seqs" for p in prompts) + " |")
        out.append("|---|" + "---:|---:|" * len(prompts))
        for pol, m in CONFIGS:
            cells = []
            for p in prompts:
                r = next(x for x in doc["part_a"] if (x["prompt"], x["policy"], x["method"]) == (p, pol, m))
                c = r["concurrency"]
                cells += [f"{r['rate']:.3f}", f"{c['memory']} ({c['within_tpot']})"]
            out.append(f"| {pol} / {m} | " + " | ".join(cells) + " |")
        out.append("")
    bws = sorted({c["host_bw_gbs"] for c in doc["crossover"]})
    outs = sorted({c["output"] for c in doc["crossover"]})
    prompts = sorted({c["prompt"] for c in doc["crossover"]})
    out.append("(b) crossover: magicpig best rate / dense best rate (dense's rate in req/s in the first column)")
    out.append("| prompt / output | dense req/s | " + " | ".join(f"{b:g} GB/s" for b in bws) + " |")
    out.append("|---|---:|" + "---:|" * len(bws))
    for p in prompts:
        for o in outs:
            row = [c for c in doc["crossover"] if (c["prompt"], c["output"]) == (p, o)]
            by_bw = {c["host_bw_gbs"]: c for c in row}
            dense = row[0]["dense_best"]
            cells = []
            for b in bws:
                c = by_bw[b]
                r = c["ratio"]
                cells.append("-" if r is None else f"{r:.2f} ({c['magicpig_best'][1]:.3f})")
            out.append(f"| {_k(p)} / {o} | {dense[1]:.3f} ({dense[0]}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(doc: dict[str, Any], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bws = sorted({c["host_bw_gbs"] for c in doc["crossover"]})
    outs = sorted({c["output"] for c in doc["crossover"]})
    prompts = sorted({c["prompt"] for c in doc["crossover"]})
    ncol = max(len(bws), 2)
    fig = Figure(figsize=(3.6 * ncol, 7.6 if doc["part_a"] else 3.8))
    FigureCanvasAgg(fig)
    rows = 2 if doc["part_a"] else 1
    if doc["part_a"]:
        pa = sorted({r["prompt"] for r in doc["part_a"]})
        x = np.arange(len(pa))
        ax1 = fig.add_subplot(rows, 2, 1)
        ax2 = fig.add_subplot(rows, 2, 2)
        w = 0.2
        for i, (pol, m) in enumerate(CONFIGS):
            sel = [next(r for r in doc["part_a"] if (r["prompt"], r["policy"], r["method"]) == (p, pol, m)) for p in pa]
            ax1.bar(x + (i - 1.5) * w, [r["rate"] for r in sel], w, label=f"{pol} / {m}")
            if pol == "chunked":  # memory capacity does not depend on the policy
                j = METHODS.index(m)
                ax2.bar(x + (j - 0.5) * 0.35, [r["concurrency"]["memory"] for r in sel], 0.35,
                        label=f"{m}: memory holds", alpha=0.5)
                ax2.bar(x + (j - 0.5) * 0.35, [r["concurrency"]["within_tpot"] for r in sel], 0.35,
                        label=f"{m}: and decode step <= TPOT SLO", hatch="//", fill=False)
        out_a = doc["part_a"][0]["output"]
        for ax, t in ((ax1, f"highest rate within SLO (req/s), output {out_a}"),
                      (ax2, f"concurrent sequences, output {out_a}")):
            ax.set_xticks(x)
            ax.set_xticklabels([f"{_k(p)} prompt" for p in pa])
            ax.set_title(t, fontsize=10)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
        ax2.set_yscale("log")
    ratios = [c["ratio"] for c in doc["crossover"] if c["ratio"] not in (None, math.inf)]
    vmax = max(abs(math.log2(r)) for r in ratios if r > 0) if ratios and any(r > 0 for r in ratios) else 1.0
    vmax = max(vmax, 0.5)
    for i, bw in enumerate(bws):
        ax = fig.add_subplot(rows, ncol, (rows - 1) * ncol + i + 1)
        grid = np.full((len(prompts), len(outs)), np.nan)
        for c in doc["crossover"]:
            if c["host_bw_gbs"] == bw and c["ratio"] not in (None, math.inf) and c["ratio"] > 0:
                grid[prompts.index(c["prompt"]), outs.index(c["output"])] = math.log2(c["ratio"])
        im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, origin="lower", aspect="auto")
        for a in range(len(prompts)):
            for b in range(len(outs)):
                c = next(c for c in doc["crossover"] if (c["host_bw_gbs"], c["prompt"], c["output"]) ==
                         (bw, prompts[a], outs[b]))
                txt = "-" if c["ratio"] is None else ("inf" if c["ratio"] == math.inf else f"{c['ratio']:.2f}")
                ax.text(b, a, txt, ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(outs)))
        ax.set_xticklabels([str(o) for o in outs])
        ax.set_yticks(range(len(prompts)))
        ax.set_yticklabels([_k(p) for p in prompts])
        ax.set_xlabel("output tokens")
        if i == 0:
            ax.set_ylabel("prompt tokens")
        ax.set_title(f"host {bw:g} GB/s", fontsize=10)
    fig.subplots_adjust(hspace=0.55)
    fig.colorbar(im, ax=fig.axes[-len(bws):], shrink=0.8, label="log2 ratio (blue: magicpig wins)")
    fig.text(0.45, 0.49 if doc["part_a"] else 0.97, "crossover: highest rate within SLO, best magicpig policy / "
             "best dense policy", ha="center", fontsize=11)
    fig.savefig(path, dpi=100)


def run(args: "argparse.Namespace") -> int:
    """The study for parsed arguments (``scripts/study_crossover.py``): run it, or print and plot
    a saved result."""
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        print(tables(doc))
        if args.plot:
            plot(doc, args.plot)
            print(f"wrote {args.plot}")
        return 0
    if args.quick:
        kw = dict(prompts=(32768, 98304), outputs=(128, 2048), bandwidths_gbs=(100, 400),
                  num_requests=args.num_requests or 24, bisect_steps=2)
    else:
        kw = dict(num_requests=args.num_requests or 48)
    doc = run_study(seed=args.seed, **kw)
    print(tables(doc))
    print(f"{doc['simulations']} simulations in {doc['runtime_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0
