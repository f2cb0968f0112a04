"""The crossover study (magicpig/perf/crossover.py, issue 13 point 7) on a tiny grid: the host-bandwidth variant,
the memory capacities, the rate search and the result's shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from magicpig.perf.gpus import build_gpu_profile
from magicpig.core.kv_budget import blocks_for
from magicpig.perf.simulator import memory_layout

from magicpig.perf import crossover as study


@pytest.fixture(scope="module")
def base():
    return build_gpu_profile("h100")


def test_bandwidth_variant_scales_row_and_append_costs_only(base):
    half = study.bandwidth_profile(base, 150e9)
    assert half.host_memory_bandwidth == 150e9
    assert half.store.row_s == pytest.approx(2 * base.store.row_s, rel=1e-12)
    assert half.store.append_s == pytest.approx(2 * base.store.append_s, rel=1e-12)
    assert (half.store.call_s, half.store.entry_s, half.store.threads) == \
        (base.store.call_s, base.store.entry_s, base.store.threads)
    assert (half.memory_bandwidth, half.link_bandwidth) == (base.memory_bandwidth, base.link_bandwidth)
    # row cost x bandwidth is constant: 1 / bandwidth
    for bw in (100e9, 200e9, 400e9):
        assert study.bandwidth_profile(base, bw).store.row_s * bw == pytest.approx(base.store.row_s * 300e9)
    with pytest.raises(ValueError):
        study.bandwidth_profile(base, 0.0)


def test_decode_step_falls_with_host_bandwidth_and_dense_ignores_it(base):
    lens = [65536] * 16
    steps = [study.cost_model(bw * 1e9, base).decode_time(lens, "magicpig", 1.0) for bw in (100, 200, 300, 400)]
    assert all(a > b for a, b in zip(steps, steps[1:])), steps
    dense = {study.cost_model(bw * 1e9, base).decode_time(lens, "dense", 1.0) for bw in (100, 400)}
    assert len(dense) == 1


def test_concurrency_matches_the_memory_layout(base):
    s = study.Study()
    cost = study.cost_model(300e9, base)
    d = s.concurrency(cost, "dense", 32768, 256)
    layout = memory_layout(cost, "dense", 256, 256, 80.0, 1536.0)
    assert d["memory"] == layout.total_blocks // blocks_for(32768 + 255, 256) == 16
    m = s.concurrency(cost, "magicpig", 32768, 256)
    assert m["memory"] > 10 * d["memory"]
    assert 0 < m["within_tpot"] <= m["memory"]
    # the host store bounds magicpig: one more sequence would overflow 1,536 GiB
    per_seq = memory_layout(cost, "magicpig", 1).cpu_bytes_per_token * (32768 + 255)
    assert m["memory"] <= 1536 * 2**30 // per_seq


def test_higher_host_bandwidth_raises_magicpig_rate_where_decode_is_host_bound(base):
    s = study.Study(num_requests=16, bisect_steps=1)
    lens = study.lengths(98304, 2048, s.requests_for(study.cost_model(300e9, base), 98304))
    assert len(lens) == 16 and all(49152 <= p <= 131072 - 2048 and o == 2048 for p, o in lens)
    slow = s.highest_rate(study.cost_model(100e9, base), lens, "chunked", "magicpig")
    fast = s.highest_rate(study.cost_model(400e9, base), lens, "chunked", "magicpig")
    assert 0 < slow["rate"] < fast["rate"], (slow, fast)
    assert slow["first_fail"] > slow["rate"]


def test_run_study_tiny_grid_has_a_ratio_per_cell():
    doc = study.run_study(prompts=(98304,), outputs=(128,), bandwidths_gbs=(100, 400), num_requests=16,
                          bisect_steps=1, skip_a=True, log=lambda *_: None)
    cells = doc["crossover"]
    assert [(c["prompt"], c["output"], c["host_bw_gbs"]) for c in cells] == [(98304, 128, 100), (98304, 128, 400)]
    for c in cells:
        assert c["ratio"] == pytest.approx(c["magicpig_best"][1] / c["dense_best"][1])
        assert math.isfinite(c["ratio"]) and c["ratio"] > 0
        assert c["dense_best"][1] == max(c["dense_rates"].values())
    json.loads(json.dumps(doc))
    assert "96k / 128" in study.tables(doc)
