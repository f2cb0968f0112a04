"""The lane cost model (magicpig/perf/cost_model.py, with shape.py, profile.py, fit.py and
gpus.py): saturation curves and their fits, the store fit, prefill and decode step times, the
decode-share search, the shipped H100 profile against SGLang's H800 figures, the JSON round
trip and input checks. No torch."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magicpig.config import MagicPIGConfig
from magicpig.perf.cost_model import CostModel
from magicpig.perf.fit import fit_saturation, fit_store_attend
from magicpig.perf.gpus import SGLANG_ERROR_BOUND, SGLANG_H800_DECODE, build_gpu_profile, main, sglang_comparison
from magicpig.perf.profile import DeviceProfile, Saturation, StoreProfile, load_profile
from magicpig.perf.shape import ModelShape

H100 = load_profile("h100_llama31_8b")
SHAPE = ModelShape.llama31_8b()
MODEL = CostModel(H100, SHAPE)
FREE_STORE = StoreProfile(call_s=0.0, row_s=0.0)


def cpu_profile() -> DeviceProfile:
    """A small CPU-kind profile (the device is the host: nothing overlaps)."""
    return DeviceProfile(
        name="test_cpu", kind="cpu", peak_flops=1e11, compute_efficiency=1.0, memory_bandwidth=2e10,
        memory_efficiency=1.0, compute_units=2, granularity=1, step_overhead_s=1e-3,
        compute_saturation=Saturation(None), memory_saturation=Saturation(0.4),
        store=StoreProfile(call_s=1e-4, row_s=5e-8, entry_s=1e-9, append_s=1e-7, threads=2),
        host_cores=2, host_memory_bandwidth=2e10, notes=("synthetic",),
    )


def test_import_pulls_in_no_torch():
    code = "import sys, magicpig.perf.cost_model; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- saturation
@pytest.mark.parametrize("sat", [Saturation(None), Saturation(0.15), Saturation(0.001), Saturation(50.0, 2.0)])
def test_saturation_is_one_at_full_share(sat):
    assert sat(1.0) == pytest.approx(1.0, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(x0=st.floats(1e-3, 1e3), p=st.floats(0.25, 4.0), a=st.floats(1e-3, 1.0), b=st.floats(1e-3, 1.0))
def test_saturation_never_decreases_with_share(x0, p, a, b):
    lo, hi = min(a, b), max(a, b)
    sat = Saturation(x0, p)
    assert 0.0 < sat(lo) <= sat(hi) * (1 + 1e-12)
    assert sat(hi) <= 1.0 + 1e-12


def test_large_x0_tends_to_linear():
    assert Saturation(1e4)(0.25) == pytest.approx(0.25, rel=1e-3)


@pytest.mark.parametrize("x0,p,fit_shape", [(0.15, 1.0, False), (0.3, 1.0, False), (0.1, 2.0, True), (0.4, 0.6, True)])
def test_fit_recovers_known_curve(x0, p, fit_shape):
    truth, full = Saturation(x0, p), 0.02
    points = [(u / 132, full / truth(u / 132)) for u in (8, 16, 32, 48, 64, 96, 132)]
    fit = fit_saturation(points, fit_shape=fit_shape)
    assert fit.saturation.x0 == pytest.approx(x0, rel=0.02)
    assert fit.saturation.shape == pytest.approx(p, rel=0.02)
    assert fit.full_time_s == pytest.approx(full, rel=0.01)
    assert max(abs(e) for e in fit.relative_errors) < 0.01


def test_fit_of_linear_points_is_linear():
    fit = fit_saturation([(x, 1.0 / x) for x in (0.25, 0.5, 1.0)])
    assert all(fit.saturation(x) == pytest.approx(x, rel=0.01) for x in (0.25, 0.5))


def test_fit_needs_two_shares():
    with pytest.raises(ValueError, match="two distinct shares"):
        fit_saturation([(0.5, 1.0), (0.5, 1.1)])


# ----------------------------------------------------------------------------- store fit
def test_store_fit_recovers_costs():
    truth = StoreProfile(call_s=40e-6, row_s=2e-9, entry_s=3e-11)
    points = [(r, e, truth.attend_time(r, e)) for r in (1e3, 1e5, 1e6, 5e6) for e in (1e4, 1e7, 1e8)]
    got = fit_store_attend(points, threads=8)
    assert (got.call_s, got.row_s, got.entry_s) == pytest.approx((40e-6, 2e-9, 3e-11), rel=1e-6)
    two = fit_store_attend([(r, truth.attend_time(r)) for r in (1e3, 1e5, 1e6)], threads=8)
    assert (two.call_s, two.row_s, two.entry_s) == pytest.approx((40e-6, 2e-9, 0.0), rel=1e-6)


def test_store_fit_keeps_costs_non_negative():
    # Rows that cost slightly less than proportional would give a negative intercept.
    got = fit_store_attend([(1e3, 0.9e-6), (1e4, 1e-5), (1e5, 1.01e-4)], threads=1)
    assert got.call_s >= 0 and got.row_s > 0


# ----------------------------------------------------------------------------- decode
def test_dense_decode_grows_with_context_and_batch():
    t = [MODEL.decode_time([n] * 8, "dense", 1.0) for n in (1024, 8192, 32768, 98304)]
    assert all(a < b for a, b in zip(t, t[1:]))
    t = [MODEL.decode_time([8192] * b, "dense", 1.0) for b in (1, 2, 8, 32)]
    assert all(a < b for a, b in zip(t, t[1:]))


def test_magicpig_device_time_grows_far_slower_than_dense():
    # The store at no cost isolates the device: only the dense layers' K/V grow with context.
    device_only = CostModel(replace(H100, store=FREE_STORE, link_latency_s=0.0), SHAPE)
    for model in (device_only, MODEL):
        growth = {m: model.decode_time([98304] * 8, m, 0.5) - model.decode_time([8192] * 8, m, 0.5)
                  for m in ("dense", "magicpig")}
        assert growth["magicpig"] > 0
        limit = 0.1 if model is device_only else 1.0  # 2 of 32 layers stay dense
        assert growth["magicpig"] < limit * growth["dense"]


def test_magicpig_needs_fewer_sms_than_dense():
    lens = [32768] * 16
    mp = MODEL.smallest_decode_share(lens, "magicpig", 0.06)
    dense = MODEL.smallest_decode_share(lens, "dense", 0.06)
    assert mp.meets_target and mp.units < dense.units


def test_magicpig_step_is_bounded_by_its_cpu_side_and_overlaps_on_a_gpu():
    lens = [65536] * 8
    device_only = CostModel(replace(H100, store=FREE_STORE, link_latency_s=0.0), SHAPE)
    device, cpu = device_only.decode_time(lens, "magicpig", 0.25), MODEL.decode_cpu_time(lens)
    step = MODEL.decode_time(lens, "magicpig", 0.25)
    assert max(device, cpu) <= step < device + cpu


def test_for_config_takes_the_magicpig_settings():
    config = MagicPIGConfig(sink_tokens=16, window_tokens=256, dense_layers=(0, 5, 16), K=8, L=75)
    model = CostModel.for_config(H100, SHAPE, config, sampled_fraction=0.05)
    got = (model.sink_tokens, model.window_tokens, model.dense_layers, model.hash_bits, model.tables)
    assert got == (16, 256, 3, 8, 75) and model.sampled_fraction == 0.05
    assert CostModel.for_config(H100, SHAPE, MagicPIGConfig()).dense_layers == 2  # first and middle


def test_cpu_profile_does_not_overlap_the_store():
    profile = cpu_profile()
    lens = [6000, 7000, 8000]
    full = CostModel(profile, SHAPE).decode_time(lens, "magicpig", 0.5)
    device = CostModel(replace(profile, store=FREE_STORE), SHAPE).decode_time(lens, "magicpig", 0.5)
    assert full - device == pytest.approx(CostModel(profile, SHAPE).decode_cpu_time(lens), rel=1e-9)


def test_ping_pong_formula_matches_a_flow_shop_simulation():
    """Two micro-batches alternate device and CPU work layer by layer (runner._run_layers)."""

    def simulate(d: float, c: float, layers: int) -> float:
        dev_free = 0.0
        cpu_done = {"a": 0.0, "b": 0.0}
        cpu_free = 0.0
        for _ in range(layers):
            for half in ("a", "b"):
                dev_end = max(dev_free, cpu_done[half]) + d
                dev_free = dev_end
                cpu_free = max(cpu_free, dev_end) + c
                cpu_done[half] = cpu_free
        return cpu_free

    for d, c in ((1.0, 0.3), (0.3, 1.0), (0.5, 0.5)):
        layers = 30
        expect = simulate(d, c, layers)
        assert MODEL._combine(2 * layers * d, 2 * layers * c, 2 * layers) == pytest.approx(expect, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 131072), min_size=1, max_size=6),
    a=st.integers(1, 132), b=st.integers(1, 132),
    method=st.sampled_from(["dense", "magicpig"]),
    chunk=st.integers(1, 8192), before=st.integers(0, 65536),
)
def test_lane_time_never_decreases_when_share_decreases(lens, a, b, method, chunk, before):
    lo, hi = min(a, b) / 132, max(a, b) / 132
    for model in (MODEL, CostModel(cpu_profile(), SHAPE)):
        assert model.decode_time(lens, method, lo) >= model.decode_time(lens, method, hi)
        assert model.prefill_time(chunk, before, lo, method) >= model.prefill_time(chunk, before, hi, method)


# ----------------------------------------------------------------------------- prefill
def test_prefill_grows_with_tokens_and_context():
    t = [MODEL.prefill_time(n, 0, 0.5) for n in (128, 1024, 4096, 8192)]
    assert all(x < y for x, y in zip(t, t[1:]))
    t = [MODEL.prefill_time(2048, c, 0.5) for c in (0, 8192, 65536)]
    assert all(x < y for x, y in zip(t, t[1:]))
    assert MODEL.prefill_time(4096, 0, 0.5, "magicpig") > MODEL.prefill_time(4096, 0, 0.5, "dense")


def test_large_prefill_is_compute_bound_and_scales_with_sms():
    # Compute saturation is linear: half the SMs, about twice the time (overheads aside).
    full, half = MODEL.prefill_time(8192, 0, 1.0), MODEL.prefill_time(8192, 0, 0.5)
    assert half / full == pytest.approx(2.0, rel=0.02)


# ----------------------------------------------------------------------------- share search
@pytest.mark.parametrize("lens", [[4096], [8192] * 8, [32768] * 16, [1000, 50000, 120000]])
@pytest.mark.parametrize("method", ["dense", "magicpig"])
@pytest.mark.parametrize("target", [0.015, 0.03, 0.06, 0.2])
def test_smallest_decode_share_matches_a_brute_force_scan(lens, method, target):
    slack = 0.9
    choice = MODEL.smallest_decode_share(lens, method, target, slack)
    fits = [u for u in range(8, 133) if (u % 8 == 0 or u == 132)
            and MODEL.decode_time(lens, method, u / 132) <= target * slack]
    if fits:
        assert (choice.units, choice.meets_target) == (min(fits), True)
        assert choice.share == choice.units / 132
    else:
        assert (choice.units, choice.share, choice.meets_target) == (132, 1.0, False)
    assert choice.time_s == pytest.approx(MODEL.decode_time(lens, method, choice.share))


def test_smallest_decode_share_flags_an_impossible_target_and_an_empty_batch():
    choice = MODEL.smallest_decode_share([98304] * 4, "magicpig", 1e-4)
    assert (choice.share, choice.meets_target) == (1.0, False)
    assert choice.time_s > 1e-4
    assert MODEL.smallest_decode_share([], "dense", 0.05).units == 0
    assert MODEL.decode_time([], "magicpig", 0.5) == 0.0


def test_cpu_grid_is_whole_cores():
    profile = cpu_profile()
    assert profile.unit_grid() == [1, 2]
    assert CostModel(profile, SHAPE).smallest_decode_share([100], "dense", 1e3).share == 0.5


# ----------------------------------------------------------------------------- GPU profile
def test_h100_profile_matches_sglang_h800_points():
    rows = sglang_comparison(MODEL)
    assert [r[0] for r in rows] == [p[0] for p in SGLANG_H800_DECODE]
    for sms, measured, modelled, err in rows:
        assert abs(err) <= SGLANG_ERROR_BOUND, f"{sms} SMs: {modelled * 1e3:.2f} ms vs {measured * 1e3} ms"
        assert err == pytest.approx(modelled / measured - 1.0)
    assert H100.fit["relative_errors"] == pytest.approx([r[3] for r in rows], abs=1e-5)


def test_shipped_profile_is_what_the_builder_makes():
    assert build_gpu_profile("h100") == H100
    assert H100.memory_saturation.x0 < 0.5  # memory saturates well before all SMs
    assert H100.compute_saturation.x0 is None


def test_h200_profile_from_the_cli(tmp_path):
    path = tmp_path / "h200.json"
    assert main(["--write-gpu-profile", str(path), "--gpu", "h200"]) == 0
    h200 = load_profile(str(path))
    assert h200.name == "h200_llama31_8b" and h200.memory_bandwidth > H100.memory_bandwidth
    lens = [8192] * 16
    assert CostModel(h200, SHAPE).decode_time(lens, "dense", 0.5) < MODEL.decode_time(lens, "dense", 0.5)


# ----------------------------------------------------------------------------- shapes, JSON
def test_llama_shape_from_hf_config_and_parameter_count():
    hf = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
          "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16", "model_type": "llama"}
    assert replace(ModelShape.from_dict(hf), name=SHAPE.name) == SHAPE
    assert ModelShape.from_dict(SHAPE.to_dict()) == SHAPE
    embed = SHAPE.vocab * SHAPE.hidden  # not in weight_bytes: decode gathers B rows of it
    params = SHAPE.weight_bytes() / SHAPE.bytes_per_param + embed
    assert params == pytest.approx(8.03e9, rel=0.002)  # Llama-3.1-8B's published size
    assert SHAPE.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2


@pytest.mark.parametrize("profile", [H100, cpu_profile()])
def test_json_round_trip(profile, tmp_path):
    assert DeviceProfile.from_json(profile.to_json()) == profile
    path = tmp_path / "p.json"
    profile.save(path)
    assert load_profile(str(path)) == profile


@pytest.mark.parametrize("method", ["dense", "magicpig"])
def test_sequence_overhead_adds_c_per_sequence_to_decode_and_defaults_to_zero(method, tmp_path):
    c = 2.5e-3
    base = cpu_profile()
    plus = replace(base, sequence_overhead_s=c)
    for lens in ([300], [300, 900, 4000, 70]):
        for share in (0.5, 1.0):
            without = CostModel(base, SHAPE).decode_time(lens, method, share)
            assert CostModel(plus, SHAPE).decode_time(lens, method, share) == pytest.approx(
                without + c * len(lens), rel=1e-12, abs=1e-15)
    assert CostModel(plus, SHAPE).prefill_time(512, 0, 1.0) == CostModel(base, SHAPE).prefill_time(512, 0, 1.0)
    assert CostModel(plus, SHAPE).decode_time([], method, 1.0) == 0.0
    assert DeviceProfile.from_json(plus.to_json()) == plus
    doc = plus.to_dict()
    del doc["device"]["sequence_overhead_s"]
    assert DeviceProfile.from_dict(doc).sequence_overhead_s == 0.0
    assert DeviceProfile.from_dict(doc) == base
    assert H100.sequence_overhead_s == 0.0  # its JSON has no such key


@pytest.mark.parametrize("method", ["dense", "magicpig"])
def test_multi_row_and_attention_efficiencies_price_what_they_name(method):
    """multi_row_efficiency slows only the weight reads of decode steps of two or more
    sequences; attention_efficiency scales only a prefill's attention FLOPs; both default to 1
    (a JSON without them loads as before)."""
    base = cpu_profile()
    slow_rows = replace(base, multi_row_efficiency=0.5)
    assert CostModel(slow_rows, SHAPE).decode_time([300], method, 1.0) == CostModel(base, SHAPE).decode_time(
        [300], method, 1.0)
    for lens in ([300, 900], [300, 900, 4000, 70]):
        assert CostModel(slow_rows, SHAPE).decode_time(lens, method, 1.0) > CostModel(base, SHAPE).decode_time(
            lens, method, 1.0)
    fast_attention = replace(base, attention_efficiency=4.0)
    flat = replace(base, step_overhead_s=0.0)
    long_ = CostModel(replace(flat, attention_efficiency=4.0), SHAPE).prefill_time(4096, 8192, 1.0)
    assert long_ < CostModel(flat, SHAPE).prefill_time(4096, 8192, 1.0)
    shape = SHAPE
    linear = CostModel(replace(flat, peak_flops=1.0, memory_bandwidth=1e300), shape)
    quarter = CostModel(replace(flat, peak_flops=1.0, memory_bandwidth=1e300, attention_efficiency=4.0), shape)
    n, c0 = 512, 2048
    assert linear.prefill_time(n, c0, 1.0) - quarter.prefill_time(n, c0, 1.0) == pytest.approx(
        0.75 * shape.attention_flops(n, c0), rel=1e-9)
    assert CostModel(fast_attention, SHAPE).decode_time([300, 900], method, 1.0) == CostModel(
        base, SHAPE).decode_time([300, 900], method, 1.0)
    doc = slow_rows.to_dict()
    del doc["device"]["multi_row_efficiency"], doc["device"]["attention_efficiency"]
    assert DeviceProfile.from_dict(doc) == base


def test_load_profile_rejects_unknown_name_and_bad_schema():
    with pytest.raises(ValueError, match="path_or_name"):
        load_profile("no_such_profile")
    with pytest.raises(ValueError, match="schema"):
        DeviceProfile.from_json('{"schema": 99}')
    with pytest.raises(ValueError, match="missing"):
        DeviceProfile.from_json('{"schema": 1, "name": "x", "kind": "gpu", "device": {}, "host": {}}')


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("call,name", [
    (lambda: MODEL.decode_time([100], "dense", 0.0), "share"),
    (lambda: MODEL.decode_time([100], "dense", 1.5), "share"),
    (lambda: MODEL.prefill_time(512, 0, -0.1), "share"),
    (lambda: MODEL.prefill_time(-5, 0, 0.5), "chunk_tokens"),
    (lambda: MODEL.prefill_time(512, -1, 0.5), "context_before"),
    (lambda: MODEL.decode_time([100, -3], "dense", 0.5), "context_lens"),
    (lambda: MODEL.decode_time([100], "sparse", 0.5), "method"),
    (lambda: MODEL.prefill_time(512, 0, 0.5, "quest"), "method"),
    (lambda: MODEL.decode_time([100], "magicpig", 0.5, sampled_fraction=0.0), "sampled_fraction"),
    (lambda: MODEL.smallest_decode_share([100], "dense", 0.0), "tbt_target_s"),
    (lambda: MODEL.smallest_decode_share([100], "dense", 0.05, slack=-1.0), "slack"),
    (lambda: Saturation(0.15)(0.0), "share"),
    (lambda: Saturation(-1.0), "x0"),
    (lambda: H100.share_of(0), "units"),
    (lambda: replace(H100, kind="tpu"), "kind"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_nan_share_is_refused():
    with pytest.raises(ValueError, match="share"):
        MODEL.decode_time([100], "dense", math.nan)
