"""The serving simulator (magicpig/perf/simulator.py): it drives the real scheduler with the
cost model's step times. Pure Python, no torch, a few seconds in all.

Checked: conservation (every request finishes once with exactly its output length; token
times never go backwards), exact step timing against the cost model for one request (whole
prompts and chunks, TTFT and TBT), completion under preemption with a tiny device, the split
lanes' decode iterations, TTFT monotone in the request rate, the trace formats, purity, CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from magicpig.perf.cost_model import CostModel
from magicpig.perf.profile import load_profile
from magicpig.core.policies import POLICIES, PolicyConfig
from magicpig.perf.simulator import (GIB, TraceItem, draw_lengths, load_trace, main, memory_layout, paced, simulate,
                                      synthetic_trace)


@pytest.fixture(scope="module")
def cost() -> CostModel:
    profile = load_profile("h100_llama31_8b")
    return CostModel(profile, profile.model)


def check_conservation(result, trace) -> None:
    """Every request finished exactly once with its output length; times never go backwards."""
    reqs = result.requests
    assert len(reqs) == len(trace) and len({r.request_id for r in reqs}) == len(trace)
    for r, item in zip(reqs, trace):
        assert r.finishes == 1 and r.finish_time is not None
        assert r.num_prompt_tokens == item.prompt_tokens
        assert len(r.token_times) == r.generated == item.output_tokens
        assert r.token_times[0] > r.arrival
        assert all(a <= b for a, b in zip(r.token_times, r.token_times[1:])), r.token_times
        assert r.finish_time == r.token_times[-1]
    m = result.metrics
    assert m["completed"] == len(trace)
    assert m["total_output_tokens"] == sum(it.output_tokens for it in trace)
    assert result.peak_blocks_used <= result.layout.total_blocks
    assert 1 <= result.peak_running <= 256


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", ["dense", "magicpig"])
def test_every_request_finishes_once_with_its_length(cost, policy, method):
    trace = synthetic_trace("mixed", 24, 6.0, seed=1)
    check_conservation(simulate(trace, cost, policy, method), trace)


@pytest.mark.parametrize("policy", ["fcfs", "chunked", "nexus"])
def test_whole_prompts_mode_conserves_too(cost, policy):
    trace = synthetic_trace("arxiv", 16, 4.0, seed=2)
    check_conservation(simulate(trace, cost, policy, "magicpig", chunked_prefill=False), trace)


# ----------------------------------------------------------------------------- exact timing
def _decode_gaps(cost, method, prompt, out):
    """The i-th gap decodes with prompt + i - 1 cached tokens, alone on the whole device."""
    return [cost.decode_time([prompt + i - 1], method, 1.0) for i in range(1, out)]


@pytest.mark.parametrize("policy", ["fcfs", "chunked", "prefill_first", "static", "nexus"])
@pytest.mark.parametrize("method", ["dense", "magicpig"])
def test_single_request_timing_matches_the_cost_model(cost, policy, method):
    prompt, out, arrival = 5000, 6, 3.25
    trace = [TraceItem(prompt, out, arrival)]
    whole = simulate(trace, cost, PolicyConfig(policy, method=method), method, chunked_prefill=False)
    r = whole.requests[0]
    assert r.token_times[0] - r.arrival == pytest.approx(cost.prefill_time(prompt, 0, 1.0, method), abs=1e-9)
    gaps = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
    assert gaps == pytest.approx(_decode_gaps(cost, method, prompt, out), abs=1e-9)

    budget = 2048  # max_prefill_tokens of fcfs, token_budget of chunked / prefill_first, chunk_tokens of split
    chunked = simulate(trace, cost, PolicyConfig(policy, method=method, token_budget=budget, chunk_tokens=budget),
                       method, max_prefill_tokens=budget)
    r = chunked.requests[0]
    expect = sum(cost.prefill_time(min(budget, prompt - s), s, 1.0, method) for s in range(0, prompt, budget))
    assert r.token_times[0] - r.arrival == pytest.approx(expect, abs=1e-9)
    gaps = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
    assert gaps == pytest.approx(_decode_gaps(cost, method, prompt, out), abs=1e-9)
    assert chunked.metrics["mean_ttft_ms"] == pytest.approx(expect * 1e3, abs=1e-6)


def test_split_lanes_decode_during_a_long_prefill(cost):
    """A decode beside a long prefill chunk: on split lanes it keeps emitting tokens (gaps of one
    decode step at its share); in one mixed batch it waits for the whole chunk."""
    trace = [TraceItem(1000, 60, 0.0), TraceItem(16000, 2, 0.2)]
    pol = dict(token_budget=8192, chunk_tokens=8192)
    split = simulate(trace, cost, PolicyConfig("nexus", **pol), "dense")
    mixed = simulate(trace, cost, PolicyConfig("chunked", **pol), "dense")
    chunk_s = cost.prefill_time(8192, 0, 1.0, "dense")

    def max_gap(res):
        t = res.requests[0].token_times
        return max(b - a for a, b in zip(t, t[1:]))

    assert max_gap(mixed) >= chunk_s
    assert max_gap(split) < chunk_s / 2
    for res in (split, mixed):
        check_conservation(res, trace)


# ----------------------------------------------------------------------------- memory
def _tiny_device_gb(cost, method, blocks):
    layout = memory_layout(cost, method, 256)
    return (layout.weight_bytes + 256 * layout.slot_bytes + blocks * layout.block_bytes + 1024) / GIB


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("chunked_prefill", [True, False])
def test_tiny_device_preempts_and_still_finishes_everything(cost, policy, chunked_prefill):
    trace = [TraceItem(1500, 400, 0.01 * i) for i in range(12)]  # 12 x 8 blocks at the end; 40 exist
    gb = _tiny_device_gb(cost, "dense", 40)
    res = simulate(trace, cost, policy, "dense", device_memory_gb=gb, chunked_prefill=chunked_prefill)
    assert res.layout.total_blocks == 40
    check_conservation(res, trace)
    assert res.preemptions > 0 and res.metrics["preemptions"] == res.preemptions
    assert sum(r.preemptions for r in res.requests) == res.preemptions


def test_small_cpu_store_limits_magicpig_admission(cost):
    trace = [TraceItem(20000, 50, 0.0) for _ in range(8)]
    layout = memory_layout(cost, "magicpig", 256)
    room = 3 * (20000 + 49) * layout.cpu_bytes_per_token  # three requests' reservations
    res = simulate(trace, cost, "chunked", "magicpig", host_memory_gb=(room + 1) / GIB)
    check_conservation(res, trace)
    assert res.peak_running == 3 and res.preemptions == 0


def test_a_request_that_can_never_fit_is_refused(cost):
    gb = _tiny_device_gb(cost, "dense", 4)
    with pytest.raises(ValueError, match=r"trace\[0\].*blocks"):
        simulate([TraceItem(4000, 10, 0.0)], cost, "fcfs", "dense", device_memory_gb=gb)
    with pytest.raises(ValueError, match="device_memory_gb"):
        simulate([TraceItem(10, 10, 0.0)], cost, "fcfs", "dense", device_memory_gb=10.0)


def test_nexus_finishes_a_prompt_that_fills_most_of_the_device(cost):
    """A part-way prefill that alone holds most of the blocks: nexus must not go decode-first
    with nothing to decode (it did, and nothing ran again)."""
    gb = _tiny_device_gb(cost, "dense", 40)
    res = simulate([TraceItem(9000, 10, 0.0)], cost, "nexus", "dense", device_memory_gb=gb)
    assert res.metrics["completed"] == 1


# ----------------------------------------------------------------------------- load
@pytest.mark.parametrize("policy", ["fcfs", "chunked", "nexus"])
def test_higher_rate_never_lowers_mean_ttft(cost, policy):
    """The same seed gives the same requests at every rate, only the gaps scale by 1/rate; with
    arrivals squeezed together every request queues at least as long here (a small sweep, not a
    theorem: a scheduler may reorder, which is why the rates are spaced 2x apart)."""
    ttft = [simulate(synthetic_trace("long_data", 30, rate, seed=3), cost, policy, "dense").metrics["mean_ttft_ms"]
            for rate in (0.5, 1.0, 2.0, 4.0, 8.0)]
    assert ttft == sorted(ttft), ttft


def test_synthetic_lengths_match_the_workload_means():
    for workload, (p_mean, o_mean) in {"long_data": (5905, 180), "arxiv": (3832, 200),
                                       "mixed": (0.6 * 496 + 0.4 * 5905, 0.6 * 97 + 0.4 * 180)}.items():
        lengths = draw_lengths(workload, 20000, seed=0)
        prompts = sum(p for p, _ in lengths) / len(lengths)
        outputs = sum(o for _, o in lengths) / len(lengths)
        assert prompts == pytest.approx(p_mean, rel=0.03) and outputs == pytest.approx(o_mean, rel=0.03)
    assert draw_lengths("arxiv", 5, seed=7) == draw_lengths("arxiv", 5, seed=7)
    assert all(p + o <= 8192 and p >= 1 and o >= 1 for p, o in draw_lengths("long_data", 2000, 1, max_context=8192))
    a, b = synthetic_trace("mixed", 10, 1.0, seed=4), synthetic_trace("mixed", 10, 4.0, seed=4)
    assert [(x.prompt_tokens, x.output_tokens) for x in a] == [(x.prompt_tokens, x.output_tokens) for x in b]
    assert [4 * y.arrival_s for y in b] == pytest.approx([x.arrival_s for x in a])


# ----------------------------------------------------------------------------- traces
def test_replayed_jsonl_trace(tmp_path, cost):
    path = tmp_path / "trace.jsonl"
    lines = [{"prompt": [1, 2, 3, 4, 5], "max_tokens": 3, "arrival_s": 0.5},
             {"prompt": "x" * 400, "prompt_tokens": 77, "max_tokens": 2, "arrival_s": 0.0},
             {"prompt": "y" * 401, "max_tokens": 1, "arrival_s": 1.0}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = load_trace(path)
    assert [(i.prompt_tokens, i.output_tokens, i.arrival_s) for i in items] == [(5, 3, 0.5), (77, 2, 0.0),
                                                                                 (101, 1, 1.0)]
    check_conservation(simulate(items, cost, "nexus", "dense"), items)
    repaced = paced(items, 2.0, ignore_trace_arrivals=True)
    assert repaced[0].arrival_s == 0.0 and repaced[1].arrival_s > 0
    path.write_text('{"prompt": [1], "max_tokens": 0}\n')
    with pytest.raises(ValueError, match="line 1: field 'max_tokens'"):
        load_trace(path)


# ----------------------------------------------------------------------------- purity and CLI
def test_import_pulls_in_no_torch():
    code = "import sys, magicpig.perf.simulator as s; s.synthetic_trace('mixed', 3, 1.0); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout + out.stderr


RUN_KEYS = {"policy", "method", "request_rate", "num_requests", "completed", "duration_s", "total_input_tokens",
            "total_output_tokens", "request_throughput", "output_throughput", "good_requests", "goodput",
            "good_fraction", "slo_ttft_s", "slo_tbt_s", "steps", "preemptions", "peak_running", "peak_blocks_used",
            "total_blocks", "completed", "total_token_throughput", "goodput_slos_ms", "request_goodput"} | {
                f"{s}_{m}_ms" for s in ("mean", "median", "std", "p95", "p99") for m in ("ttft", "tpot", "itl", "e2el")}


def test_cli_sweep_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    argv = ["--num-requests", "6", "--rates", "1", "3", "--policies", "chunked", "nexus", "--methods", "dense",
            "magicpig", "--workload", "mixed", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"prog", "args", "profile", "model", "arrivals", "layouts", "runs"}
    assert len(doc["runs"]) == 2 * 2 * 2 and set(doc["runs"][0]) == RUN_KEYS
    assert {(r["policy"], r["method"], r["request_rate"]) for r in doc["runs"]} == {
        (p, m, r) for p in ("chunked", "nexus") for m in ("dense", "magicpig") for r in (1.0, 3.0)}
    assert all(r["completed"] == 6 for r in doc["runs"])
    assert set(doc["layouts"]) == {"dense", "magicpig"} and doc["layouts"]["dense"]["total_blocks"] > 0
    assert png.stat().st_size > 1000
    table = capsys.readouterr().out
    assert "TTFT p95" in table and "nexus" in table


@pytest.mark.parametrize("argv, name", [(["--rates", "fast"], "--rates"), (["--policies", "fifo"], "--policies"),
                                        (["--methods", "sparse"], "--methods"),
                                        (["--device-memory-gb", "-1"], "--device-memory-gb")])
def test_cli_bad_argument_names_it(argv, name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert name in capsys.readouterr().err


def test_cli_cross_option_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--json"):
        main(["--json", str(tmp_path / "missing" / "x.json")])
    with pytest.raises(ValueError, match="--profile"):
        main(["--profile", "no_such_profile"])
    with pytest.raises(ValueError, match="--max-context"):
        main(["--max-context", "1"])
