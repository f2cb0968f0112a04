"""The decode benchmark (magicpig.perf.bench_decode, scripts/bench_decode.py; issue 14 point 1)
on a tiny run: 2 layers of Llama-3.1-8B shapes, contexts 64 (no middle: magicpig is exact) and
1024, batches 1 and 2 (2: the ping-pong). Checks the JSON's completeness and arithmetic, and
that the methods' first-step logits agree where they must."""

from __future__ import annotations

import json
import os

import pytest
import torch

from magicpig.perf import bench_decode as bench

CONTEXTS, BATCHES = (64, 1024), (1, 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_decode") / "decode.json"
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    results = bench.main(["--contexts", *map(str, CONTEXTS), "--batches", *map(str, BATCHES), "--layers", "2",
                          "--vocab", "512", "--warmup", "1", "--repeats", "2", "--json", str(path)])
    # the benchmark pins the calling thread and sets torch's thread count; it must give both back
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == threads
    with open(path) as f:
        return {(r.context, r.batch): r for r in results}, json.load(f)


def test_json_has_every_method_context_and_batch(run):
    _, report = run
    assert report["skipped"] == []
    cases = {(c["context"], c["batch"]): c for c in report["cases"]}
    assert set(cases) == {(n, b) for n in CONTEXTS for b in BATCHES}
    for (n, b), c in cases.items():
        assert set(c["tokens_per_s"]) == set(c["step_ms"]) == set(bench.METHODS)
        assert c["micro_batches"] == b and c["ping_pong"] == (b == 2)  # batch 1: no ping-pong
    setup = report["setup"]
    assert setup["device_threads"] >= 1 and setup["store_threads"] >= 1
    assert set(report["goals"]) == {"overlap_efficiency_ge_0.7_at_batch_ge_4",
                                    "overlap_faster_than_dense_at_32k_and_96k"}


def test_tokens_per_s_and_efficiency_follow_from_the_reported_times(run):
    _, report = run
    for c in report["cases"]:
        for m in bench.METHODS:
            assert c["step_ms"][m] > 0
            assert c["tokens_per_s"][m] == pytest.approx(c["batch"] / (c["step_ms"][m] / 1e3), rel=1e-9)
        assert c["t_step_ms"] == c["step_ms"]["magicpig_overlap"]
        assert 0 < c["t_device_ms"] <= c["step_ms"]["magicpig_serial"]
        assert c["t_cpu_ms"] > 0
        eff = (c["t_device_ms"] + c["t_cpu_ms"] - c["t_step_ms"]) / min(c["t_device_ms"], c["t_cpu_ms"])
        assert c["overlap_efficiency"] == pytest.approx(eff, rel=1e-9)
        ratio = c["tokens_per_s"]["magicpig_overlap"] / c["tokens_per_s"]["dense"]
        assert c["speedup_overlap_vs_dense"] == pytest.approx(ratio, rel=1e-9)


def test_serial_and_overlapped_magicpig_give_the_same_logits(run):
    results, report = run
    for r in results.values():
        serial, overlap = r.logits["magicpig_serial"], r.logits["magicpig_overlap"]
        assert serial.shape == (r.batch, 512) and torch.isfinite(serial).all()
        torch.testing.assert_close(overlap, serial, rtol=1e-5, atol=1e-5)
    assert all(c["logits"]["serial_vs_overlap_max_abs"] <= 1e-5 for c in report["cases"])


def test_magicpig_is_exact_without_a_middle_and_samples_with_one(run):
    results, _ = run
    for b in BATCHES:
        short, long_ = results[(64, b)], results[(1024, b)]
        assert short.sampled_fraction == 0.0  # 64 tokens fit in sinks + window
        assert short.logit_checks()["magicpig_vs_dense_rel"] < 0.02  # bf16 rounding only
        assert 0.0 < long_.sampled_fraction < 0.5
        assert long_.logit_checks()["magicpig_vs_dense_rel"] > 0.0
        assert long_.store_bytes_per_seq > 0 and short.store_bytes_per_seq < long_.store_bytes_per_seq


def test_a_sequence_decodes_the_same_alone_and_in_the_ping_pong(run):
    """Sequence 0 has the same K/V and token at every batch: its logits at batch 1 (one
    micro-batch) and batch 2 (two, overlapped) must agree."""
    results, _ = run
    for n in CONTEXTS:
        one, two = results[(n, 1)].logits, results[(n, 2)].logits
        torch.testing.assert_close(two["magicpig_overlap"][:1], one["magicpig_overlap"], rtol=1e-4, atol=1e-4)
        rel = torch.linalg.vector_norm(two["dense"][:1] - one["dense"]) / torch.linalg.vector_norm(one["dense"])
        assert rel < 0.02  # dense: different GEMM shapes, bf16


def test_memory_estimate_covers_the_store(run):
    """The memory guard's store term is at least what the store holds (1 sparse layer here)."""
    results, _ = run
    config = bench.bench_config("magicpig", 1)
    for r in (results[(1024, 1)], results[(1024, 2)]):
        middle = 1024 - config.sink_tokens - config.window_tokens
        assert 0 < r.store_bytes_per_seq <= bench.store_bytes_estimate(config, bench.HKV, bench.D, middle)


def test_bad_arguments_are_one_line_errors(capsys):
    for argv in (["--repeats", "0"], ["--warmup", "20", "--repeats", "20"], ["--layers", "1"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bench_decode.py: "), err
