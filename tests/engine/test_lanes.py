"""Lanes (magicpig.engine.lanes.py): the two lanes of a split policy give the same results
however they run, errors come back to the caller, and the CUDA path runs where there is CUDA."""

from __future__ import annotations

import threading

import pytest
import torch

from magicpig import Engine, LongContextModel, MagicPIGConfig, SamplingParams
from magicpig.engine.lanes import InterleavedLanes, ThreadLanes, make_lanes, per_thread_counts_honoured


def test_thread_lanes_run_both_lanes_on_their_own_threads_with_their_counts():
    lanes = ThreadLanes(cores=4)
    seen = {}
    both_running = threading.Barrier(2, timeout=30)  # passes only if the two lanes run at once

    def lane(name):
        def run():
            seen[name] = (threading.current_thread().name, torch.get_num_threads())
            both_running.wait()
            return name

        return run

    before = torch.get_num_threads()
    try:
        p, d, times = lanes.run(lane("prefill"), lane("decode"), prefill_share=0.75)
    finally:
        lanes.close()
    assert (p, d) == ("prefill", "decode")
    assert seen["prefill"][1] == 3 and seen["decode"][1] == 1  # 0.75 of 4 cores, and the rest
    assert seen["prefill"][0] != seen["decode"][0] == threading.current_thread().name
    assert torch.get_num_threads() == before  # the caller's count is given back
    assert times.step_s >= max(times.prefill_s, times.decode_s) >= 0


def test_a_lane_error_reaches_the_caller_and_one_lane_runs_inline():
    lanes = ThreadLanes(cores=2)
    try:
        with pytest.raises(ZeroDivisionError):
            lanes.run(lambda: 1 / 0, lambda: 1, prefill_share=0.5)
        p, d, _ = lanes.run(None, lambda: "d", prefill_share=0.5)  # nothing to prefill: no thread
        assert (p, d) == (None, "d")
    finally:
        lanes.close()
    p, d, _ = InterleavedLanes().run(lambda: "p", lambda: "d", None)
    assert (p, d) == ("p", "d")


def test_make_lanes_on_the_cpu_follows_the_measurement():
    honoured, measured = per_thread_counts_honoured()
    assert "1 thread" in measured and "worker set to 1" in measured
    lanes = make_lanes(torch.device("cpu"))
    try:
        assert lanes.kind == ("threads" if honoured else "interleaved"), lanes.description
    finally:
        lanes.close()
    assert make_lanes(torch.device("cpu"), "interleaved").kind == "interleaved"
    with pytest.raises(ValueError, match="lanes='green'"):
        make_lanes(torch.device("cpu"), "green")


@pytest.fixture(scope="module")
def model() -> LongContextModel:
    return LongContextModel.from_pretrained(device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("method", ["dense", "magicpig"])
def test_engine_lanes_on_threads_give_the_interleaved_tokens(model, method):
    """A split policy (static) with its lanes on two threads (prefill and decode at once on the
    shared runner) gives every request the greedy tokens of the same schedule interleaved."""
    config = MagicPIGConfig(method=method, window_tokens=16, K=8, L=60, kv_dtype="fp32")
    prompts = [model.encode(t)[0][0] for t in ("Write one sentence about the sea. " * 12,
                                                "Count from one to ten in words.", "Name three colours. " * 20,
                                                "Describe a cat in five words. " * 6)]
    results = {}
    for kind in ("interleaved", "threads"):
        engine = Engine(model.loaded, config, max_num_seqs=4, policy="static", lanes="interleaved")
        if kind == "threads":
            engine.lanes = ThreadLanes(cores=2)  # forced, whatever this machine's measurement says
        try:
            ids = [engine.add_request(p, SamplingParams(max_new_tokens=12 + 3 * i)) for i, p in enumerate(prompts)]
            tokens = {i: [] for i in ids}
            concurrent_steps = 0
            while engine.has_unfinished():
                record = engine.step()
                for out in record.outputs:
                    tokens[out.request_id] += out.new_token_ids
                t = record.lane_times
                concurrent_steps += t.prefill_s > 0 and t.decode_s > 0
            results[kind] = [tokens[i] for i in ids]
            engine.reset_prefix_cache()
            assert engine.blocks_in_use() == 0 and engine.cpu_store_bytes() == 0
        finally:
            engine.close()
        assert concurrent_steps >= 2, kind  # prompts joined while others decoded
    assert results["threads"] == results["interleaved"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="green contexts need CUDA (scripts/gpu_check.sh)")
def test_green_context_lanes_grant_sms_and_run_both_lanes():
    from torch.cuda import green_contexts

    if not green_contexts.SUPPORTED:
        pytest.skip("this torch was built without green contexts")
    lanes = make_lanes(torch.device("cuda"))
    try:
        assert lanes.kind == "green-contexts", lanes.description
        for asked, (p_sms, d_sms) in lanes.granted.items():
            assert 0 < p_sms <= asked + 8 and 0 < d_sms <= lanes.total_sms - asked + 8
        x = torch.randn(2048, 2048, device="cuda")
        p, d, times = lanes.run(lambda: (x @ x).sum().item(), lambda: (x * 2).sum().item(), prefill_share=0.5)
        assert p == pytest.approx((x @ x).sum().item(), rel=1e-3) and d == pytest.approx(2 * x.sum().item(), rel=1e-4)
    finally:
        lanes.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs the real checks")
def test_gpu_check_script_says_there_is_no_cuda_and_exits_0(tmp_path):
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "no CUDA device" in run.stdout, run.stdout + run.stderr
