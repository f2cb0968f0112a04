"""Bad arguments raise clear Python errors instead of crashing the process (issue #10).

The raw entry points of magicpig._C may be called directly, so they check sizes and ranges in
C++; CPUStore and MagicPIGConfig bound thread counts (OpenMP aborts the process when asked for
tens of thousands); non-finite keys/values are refused before any native call; removing a
sequence waits for pending attends that read it. Each crash reproducer runs in a child
process, so a segfault or an abort fails its test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from magicpig.config import MagicPIGConfig, max_cpu_threads
from magicpig.lsh import SimHash
from magicpig.store import CPUStore, extension_available

needs_ext = pytest.mark.skipif(not extension_available(), reason="extension not built")
BACKENDS = [pytest.param("cpp", marks=needs_ext), "numba"]


def run_child(code: str) -> str:
    """Run `code` in a fresh interpreter; it must exit cleanly (no signal). Returns stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


# The child's helper: call, expect an exception, print "<Type>: <message>".
EXPECT = """
def expect(fn):
    try:
        fn()
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
    else:
        print("no exception")
"""

# A raw store: 2 KV heads, head_dim 8, K=4, L=6, m=2, fp32 (dtype code 2). The weight table
# only needs the right shape here; the numbers are irrelevant to these checks.
RAW = EXPECT + """
import numpy as np
from magicpig import _C
H, d, K, L = 2, 8, 4, 6
TABLE, T_LO, STEP, FLOOR = [0.0, 0.0, 0.0, 0.0], -1.0, 1.0, -30.0
def store(H=H, d=d, K=K, L=L, m=2, dtype=2, threads=0, table=TABLE, t_lo=T_LO, h=STEP, floor=FLOOR):
    return _C.Store(H, d, K, L, m, dtype, threads, table, t_lo, h, floor)
s = store()
sid = s.add_sequence()
t = 10
keys = np.ones((H, t, d), np.float32)
codes = np.zeros((H, t, L), np.int32)
s.append(sid, keys, keys, codes, t)
B, Hq = 1, 2 * H
ids = np.array([sid], np.int64)
q = np.ones((B, Hq, d), np.float32)
qc = np.zeros((B, Hq, L), np.int32)
out = np.zeros((B, Hq, d), np.float32)
lse = np.zeros((B, Hq), np.float32)
nc = np.zeros((B, Hq), np.int32)
x = np.ones((1, 10, d), np.float32)
proj = np.ones((1, d, K * L), np.float32)
xc = np.zeros((1, 10, L), np.int32)
"""

RAW_CASES = {
    # Store(...)
    "store_dtype_7": ("store(dtype=7)", "ValueError", "dtype=7"),
    "store_negative_threads": ("store(threads=-1)", "ValueError", "num_threads=-1"),
    "store_huge_threads": ("store(threads=100000)", "ValueError", "num_threads=100000"),
    "store_K_40": ("store(K=40)", "ValueError", "K=40"),
    "store_K_0": ("store(K=0)", "ValueError", "K=0"),
    "store_L_0": ("store(L=0)", "ValueError", "L=0"),
    "store_L_2000": ("store(L=2000)", "ValueError", "L=2000"),
    "store_m_above_L": ("store(m=7)", "ValueError", "min_collisions=7"),
    "store_heads_0": ("store(H=0)", "ValueError", "num_kv_heads=0"),
    "store_head_dim_0": ("store(d=0)", "ValueError", "head_dim=0"),
    "store_head_dim_huge": ("store(d=100000)", "ValueError", "head_dim=100000"),
    "store_empty_table": ("store(table=[])", "ValueError", "table"),
    "store_odd_table": ("store(table=[0.0] * 5)", "ValueError", "table"),
    "store_zero_step": ("store(h=0.0)", "ValueError", "h > 0"),
    "store_nan_t_lo": ("store(t_lo=float('nan'))", "ValueError", "t_lo"),
    # Store.append(seq_id, keys, values, key_codes, t)
    "append_t_10M": ("s.append(sid, keys, keys, codes, 10_000_000)", "ValueError", "keys"),
    "append_t_negative": ("s.append(sid, keys, keys, codes, -1)", "ValueError", "t=-1"),
    "append_values_short": ("s.append(sid, keys, keys[:, :5].copy(), codes, t)", "ValueError", "values"),
    "append_codes_short": ("s.append(sid, keys, keys, codes[:, :5].copy(), t)", "ValueError", "key_codes"),
    "append_wrong_itemsize": ("s.append(sid, keys.astype(np.float16), keys, codes, t)", "ValueError", "keys"),
    "append_not_contiguous": ("s.append(sid, np.ones((H, 2 * t, d), np.float32)[:, ::2], keys, codes, t)",
                              "ValueError", "C-contiguous"),
    "append_unknown_seq": ("s.append(sid + 5, keys, keys, codes, t)", "IndexError", "seq_id"),
    "append_code_too_big": ("s.append(sid, keys, keys, codes + 16, t)", "ValueError", "key_codes"),
    "append_code_negative": ("s.append(sid, keys, keys, codes - 1, t)", "ValueError", "key_codes"),
    # Store.attend(seq_ids, B, Hq, queries, query_codes, out, lse, num_candidates)
    "attend_B_too_big": ("s.attend(ids, 100, Hq, q, qc, out, lse, nc)", "ValueError", "seq_ids"),
    "attend_B_negative": ("s.attend(ids, -1, Hq, q, qc, out, lse, nc)", "ValueError", "B=-1"),
    "attend_Hq_not_multiple": ("s.attend(ids, B, 3, q, qc, out, lse, nc)", "ValueError", "Hq=3"),
    "attend_Hq_0": ("s.attend(ids, B, 0, q, qc, out, lse, nc)", "ValueError", "Hq=0"),
    "attend_Hq_too_big": ("s.attend(ids, B, 64, q, qc, out, lse, nc)", "ValueError", "queries"),
    "attend_queries_short": ("s.attend(ids, B, Hq, q[:, :2].copy(), qc, out, lse, nc)", "ValueError", "queries"),
    "attend_codes_short": ("s.attend(ids, B, Hq, q, qc[:, :2].copy(), out, lse, nc)", "ValueError", "query_codes"),
    "attend_out_short": ("s.attend(ids, B, Hq, q, qc, out[:, :2].copy(), lse, nc)", "ValueError", "out"),
    "attend_lse_short": ("s.attend(ids, B, Hq, q, qc, out, lse[:, :2].copy(), nc)", "ValueError", "lse"),
    "attend_ncand_short": ("s.attend(ids, B, Hq, q, qc, out, lse, nc[:, :2].copy())", "ValueError",
                           "num_candidates"),
    "attend_ids_int32": ("s.attend(ids.astype(np.int32), B, Hq, q, qc, out, lse, nc)", "ValueError", "seq_ids"),
    "attend_unknown_seq": ("s.attend(ids + 5, B, Hq, q, qc, out, lse, nc)", "IndexError", "seq_id"),
    "attend_code_too_big": ("s.attend(ids, B, Hq, q, qc + 16, out, lse, nc)", "ValueError", "query_codes"),
    "attend_code_negative": ("s.attend(ids, B, Hq, q, qc - 1, out, lse, nc)", "ValueError", "query_codes"),
    # simhash_codes(x, H, n, d, projection, K, L, codes, num_threads)
    "simhash_n_10M": ("_C.simhash_codes(x, 1, 10_000_000, d, proj, K, L, xc, 0)", "ValueError", "x"),
    "simhash_H_0": ("_C.simhash_codes(x, 0, 10, d, proj, K, L, xc, 0)", "ValueError", "H=0"),
    "simhash_H_big": ("_C.simhash_codes(x, 1000, 10, d, proj, K, L, xc, 0)", "ValueError", "x"),
    "simhash_n_negative": ("_C.simhash_codes(x, 1, -1, d, proj, K, L, xc, 0)", "ValueError", "n=-1"),
    "simhash_d_0": ("_C.simhash_codes(x, 1, 10, 0, proj, K, L, xc, 0)", "ValueError", "d=0"),
    "simhash_K_40": ("_C.simhash_codes(x, 1, 10, d, proj, 40, L, xc, 0)", "ValueError", "K=40"),
    "simhash_L_0": ("_C.simhash_codes(x, 1, 10, d, proj, K, 0, xc, 0)", "ValueError", "L=0"),
    "simhash_L_2000": ("_C.simhash_codes(x, 1, 10, d, proj, K, 2000, xc, 0)", "ValueError", "L=2000"),
    "simhash_negative_threads": ("_C.simhash_codes(x, 1, 10, d, proj, K, L, xc, -1)", "ValueError",
                                 "num_threads=-1"),
    "simhash_huge_threads": ("_C.simhash_codes(x, 1, 10, d, proj, K, L, xc, 100000)", "ValueError",
                             "num_threads=100000"),
    "simhash_projection_short": ("_C.simhash_codes(x, 1, 10, d, proj[:, :4].copy(), K, L, xc, 0)", "ValueError",
                                 "projection"),
    "simhash_codes_short": ("_C.simhash_codes(x, 1, 10, d, proj, K, L, xc[:, :5].copy(), 0)", "ValueError",
                            "codes"),
    "simhash_x_float64": ("_C.simhash_codes(x.astype(np.float64), 1, 10, d, proj, K, L, xc, 0)", "ValueError",
                          "x"),
    "simhash_x_not_contiguous": ("_C.simhash_codes(np.ones((1, 10, 2 * d), np.float32)[:, :, ::2], 1, 10, d, proj, "
                                 "K, L, xc, 0)", "ValueError", "C-contiguous"),
}


@needs_ext
@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_extension_raises_on_bad_arguments(case):
    call, exc, word = RAW_CASES[case]
    out = run_child(RAW + f"expect(lambda: {call})\n").strip().splitlines()[-1]
    assert out.startswith(f"{exc}: "), out
    assert word in out, out


@needs_ext
def test_raw_extension_valid_calls_still_work():
    # The same prelude without errors, plus empty batches: what the checks must keep accepting.
    out = run_child(RAW + """
s.attend(ids, B, Hq, q, qc, out, lse, nc)
assert (nc == t).all(), nc  # every key collides in all L tables
s.attend(np.zeros(0, np.int64), 0, Hq, q[:0], qc[:0], out[:0], lse[:0], nc[:0])
s.append(sid, keys[:, :0], keys[:, :0], codes[:, :0], 0)
_C.simhash_codes(x, 1, 10, d, proj, K, L, xc, 0)
assert (xc == (1 << K) - 1).all()
_C.simhash_codes(x[:, :0], 1, 0, d, proj, K, L, xc[:, :0], 0)
one = np.ones((5, 1, d), np.float32)[::5]  # C-contiguous: a size-1 dim may carry any stride
_C.simhash_codes(one, 1, 1, d, proj, K, L, xc[:, :1].copy(), 1)
print("ok", s.length(sid))
""")
    assert out.strip().endswith("ok 10"), out


@pytest.mark.parametrize("threads", [50000, 100000, -1, 0])
def test_cpu_store_thread_count_is_bounded(threads):
    out = run_child(EXPECT + f"""
from magicpig.store import CPUStore
for backend in ("cpp", "numba"):
    expect(lambda: CPUStore(2, 8, 4, 6, num_threads={threads}, backend=backend))
""").strip().splitlines()
    assert len(out) == 2, out  # checked before the backend is chosen, so also without the extension
    for line in out:
        assert line.startswith(f"ValueError: num_threads={threads}: expected an integer in [1, "), line


def test_config_thread_count_is_bounded():
    out = run_child(EXPECT + """
from magicpig.config import MagicPIGConfig
expect(lambda: MagicPIGConfig(cpu_threads=100000))
""")
    assert out.startswith("ValueError: MagicPIGConfig.cpu_threads=100000"), out


def test_thread_count_limit_is_accepted():
    limit = max_cpu_threads()
    assert CPUStore(1, 8, 3, 4, num_threads=np.int64(limit)).num_threads == limit
    assert MagicPIGConfig(cpu_threads=limit).cpu_threads == limit
    with pytest.raises(ValueError, match=f"num_threads={limit + 1}: expected an integer in \\[1, {limit}\\]"):
        CPUStore(1, 8, 3, 4, num_threads=limit + 1)
    with pytest.raises(TypeError, match="num_threads=True"):
        CPUStore(1, 8, 3, 4, num_threads=True)


# -- non-finite keys and values -----------------------------------------------------------------
def _kv_with(which, value, H=2, t=5, d=8):
    kv = {"keys": torch.randn(H, t, d), "values": torch.randn(H, t, d)}
    kv[which][1, 3, 2] = value
    return kv["keys"], kv["values"]


def _refused(backend, kv_dtype, which, value, match):
    """Append a K/V pair with one bad entry: ValueError matching `match`, nothing stored; then
    the same append with that entry fixed goes through."""
    H, d, K, L, t = 2, 8, 4, 6, 5
    store = CPUStore(H, d, K, L, kv_dtype=kv_dtype, backend=backend)
    sid = store.add_sequence()
    codes = torch.zeros(H, t, L, dtype=torch.int32)
    keys, values = _kv_with(which, value)
    with pytest.raises(ValueError, match=match):
        store.append(sid, keys, values, codes)
    assert store.length(sid) == 0
    keys, values = _kv_with(which, 1.0)
    store.append(sid, keys, values, codes)
    assert store.length(sid) == t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["keys", "values"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp16", "fp32"])
def test_non_finite_kv_refused(backend, which, value, kv_dtype):
    _refused(backend, kv_dtype, which, value, f"^{which}: expected finite values, got nan or inf$")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["keys", "values"])
def test_kv_overflowing_the_store_dtype_refused(backend, which):
    # Finite in fp32, inf in fp16/bf16: what would be stored is checked, not what was passed.
    _refused(backend, "fp16", which, 1e5, rf"^{which}: non-finite after conversion to fp16 \(\|x\| > 65504\?\)$")
    _refused(backend, "fp16", which, -7e4, rf"^{which}: non-finite after conversion to fp16")
    _refused(backend, "bf16", which, 3.4e38, rf"^{which}: non-finite after conversion to bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_finite_kv_accepted(backend):
    for kv_dtype, big in (("fp16", 6e4), ("fp32", 1e30), ("bf16", 1e38)):
        store = CPUStore(2, 8, 4, 6, kv_dtype=kv_dtype, backend=backend)
        sid = store.add_sequence()
        keys, values = _kv_with("values", big)
        store.append(sid, keys, values, torch.zeros(2, 5, 6, dtype=torch.int32))
        assert store.length(sid) == 5


# -- removing a sequence while an attend on it is pending ----------------------------------------
class _GatedImpl:
    """The store's native object with attend held until `go` is set (a deterministic 'pending')."""

    def __init__(self, impl):
        self._impl = impl
        self.go = threading.Event()

    def __getattr__(self, name):
        return getattr(self._impl, name)

    def attend(self, *args):
        self.go.wait(timeout=60)
        return self._impl.attend(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_waits_for_pending_attend(backend):
    H, d, K, L, n = 2, 16, 4, 12, 300
    sh = SimHash(d, K, L, seed=1)
    store = CPUStore(H, d, K, L, backend=backend)
    sid, other = store.add_sequence(), store.add_sequence()
    gen = torch.Generator().manual_seed(0)
    for s in (sid, other):
        k = torch.randn(H, n, d, generator=gen)
        store.append(s, k, torch.randn(H, n, d, generator=gen), sh.hash(k))
    q = torch.randn(2, 2 * H, d, generator=gen)
    qc = sh.hash(q)
    want = store.attend([sid, other], q, qc)
    store._impl = gate = _GatedImpl(store._impl)
    handle = store.attend_async([sid, other], q, qc)
    remover = threading.Thread(target=store.remove_sequence, args=(sid,))
    remover.start()
    time.sleep(0.3)
    assert remover.is_alive() and not handle.done()  # remove waits for the attend reading sid
    with pytest.raises(ValueError, match="unknown sequence"):  # and new attends are refused
        store.attend_async([sid], q[:1], qc[:1])
    gate.go.set()
    remover.join(timeout=60)
    for got, ref in zip(handle.wait(), want):
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="unknown sequence"):
        store.length(sid)
    store.remove_sequence(other)  # nothing pending: returns at once
    store.close()


@needs_ext
def test_remove_during_pending_attend_async_in_child():
    # The plain race, without a gate, many times over: no crash, every wait() gives a result.
    out = run_child("""
import torch
from magicpig.store import CPUStore
H, d, K, L = 2, 32, 6, 30
store = CPUStore(H, d, K, L, backend="cpp")
q = torch.randn(1, 2 * H, d)
qc = torch.randint(0, 1 << K, (1, 2 * H, L), dtype=torch.int32)
done = 0
for _ in range(30):
    sid = store.add_sequence()
    k = torch.randn(H, 5000, d)
    store.append(sid, k, k, torch.randint(0, 1 << K, (H, 5000, L), dtype=torch.int32))
    handle = store.attend_async([sid], q, qc)
    store.remove_sequence(sid)
    out, lse, nc = handle.wait()
    done += out.shape[0]
print("ok", done)
""")
    assert out.strip() == "ok 30", out


@needs_ext
def test_raw_remove_while_attends_run_on_another_thread():
    # C++ alone: attends on a thread, removes on another. An attend holds its sequences' locks
    # for its whole run, so a remove waits for it; an attend that comes later raises IndexError.
    out = run_child("""
import threading
import numpy as np
from magicpig import _C
H, d, K, L, t = 2, 64, 6, 30, 20000
s = _C.Store(H, d, K, L, 2, 2, 0, [0.0, 0.0, 0.0, 0.0], -1.0, 1.0, -30.0)
rng = np.random.default_rng(0)
keys = rng.standard_normal((H, t, d), dtype=np.float32)
codes = rng.integers(0, 1 << K, (H, t, L), dtype=np.int32)
q = rng.standard_normal((1, 2 * H, d), dtype=np.float32)
qc = rng.integers(0, 1 << K, (1, 2 * H, L), dtype=np.int32)
ok = refused = 0
for _ in range(20):
    sid = s.add_sequence()
    s.append(sid, keys, keys, codes, t)
    ids = np.array([sid], np.int64)
    def reader():
        global ok, refused
        while True:
            out = np.zeros((1, 2 * H, d), np.float32)
            lse, nc = np.zeros((1, 2 * H), np.float32), np.zeros((1, 2 * H), np.int32)
            try:
                s.attend(ids, 1, 2 * H, q, qc, out, lse, nc)
                ok += 1
            except IndexError:
                refused += 1
                return
    thread = threading.Thread(target=reader)
    thread.start()
    s.remove_sequence(sid)
    thread.join()
print("ok", refused)
""")
    assert out.strip() == "ok 20", out
