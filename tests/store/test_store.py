"""CPUStore (C++ and numba backends) against the exact torch reference.

Every case builds sequences of keys/values/codes, attends with both backends and checks:
candidate counts equal the reference's candidate_mask exactly, and out/lse equal
sampled_attention fed the same (dtype-rounded) keys and values.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch

from magicpig.attention.reference import candidate_mask, sampled_attention
from magicpig.lsh import LOG_U_FLOOR, SimHash, log_collision_probability
from magicpig.store import CPUStore, extension_available
from magicpig.store.weights import log_u_table

BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not extension_available(), reason="extension not built")),
    "numba",
]
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_tokens(gen, H, n, d, offset=0.0, clusters=0):
    """Keys/values [H, n, d]; optionally keys drawn around a few cluster centres (skewed buckets)."""
    k = torch.randn(H, n, d, generator=gen)
    if clusters:
        centres = torch.randn(H, clusters, d, generator=gen) * 3
        k = k + centres[:, torch.randint(0, clusters, (n,), generator=gen)]
    v = torch.randn(H, n, d, generator=gen)
    return k + offset, v


def reference(q, qc, k, v, kc, K, L, m, kv_dtype):
    """The oracle on keys/values rounded to the store dtype (what the store reads)."""
    kr = k.to(TORCH_DTYPE[kv_dtype]).float()[None]
    vr = v.to(TORCH_DTYPE[kv_dtype]).float()[None]
    mask = candidate_mask(qc, kc[None], m)
    out, lse = sampled_attention(q, kr, vr, mask, K, L, m)
    return out, lse, mask.sum(-1).to(torch.int32)


def assert_matches(got, want, rtol=1e-5):
    out, lse, nc = got
    rout, rlse, rnc = want
    assert torch.equal(nc, rnc), f"candidate counts differ: {nc} vs {rnc}"
    empty = rnc == 0
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.all(out[empty] == 0)
    finite = ~empty
    if finite.any():
        torch.testing.assert_close(lse[finite], rlse[finite], rtol=rtol, atol=rtol * 2)
        scale = rout[finite].abs().amax().clamp_min(1e-3)
        torch.testing.assert_close(out[finite], rout[finite], rtol=rtol, atol=rtol * float(scale))


def run_case(backend, *, H=2, G=2, d=32, K=6, L=24, m=2, lengths=(500,), kv_dtype="fp32", chunks=1, seed=0,
             clusters=0, queries_near_keys=True):
    """Append each sequence (in `chunks` pieces), attend all of them as one batch, compare."""
    gen = torch.Generator().manual_seed(seed)
    sh = SimHash(d, K, L, seed=seed + 1)
    store = CPUStore(H, d, K, L, m, kv_dtype=kv_dtype, backend=backend)
    seqs = []
    for n in lengths:
        k, v = make_tokens(gen, H, n, d, clusters=clusters)
        kc = sh.hash(k) if n else torch.zeros(H, 0, L, dtype=torch.int32)
        sid = store.add_sequence()
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            store.append(sid, k[:, a:b], v[:, a:b], kc[:, a:b])
        seqs.append((sid, k, v, kc))
    B, Hq = len(lengths), H * G
    q = torch.randn(B, Hq, d, generator=gen)
    if queries_near_keys:  # a query close to a key of its sequence -> a peaked distribution
        for b, (_, k, _, _) in enumerate(seqs):
            if k.shape[1]:
                q[b] += 2 * k[torch.arange(Hq) // G, torch.randint(0, k.shape[1], (Hq,), generator=gen)]
    qc = sh.hash(q)
    got = store.attend([s[0] for s in seqs], q, qc)
    assert int(got[2].sum()) > 0, "a case without any candidate tests nothing"
    for b, (sid, k, v, kc) in enumerate(seqs):
        if k.shape[1] == 0:
            continue  # the reference needs at least one key; checked by the caller
        want = reference(q[b : b + 1], qc[b : b + 1], k, v, kc, K, L, m, kv_dtype)
        assert_matches(tuple(x[b : b + 1] for x in got), want)
    return store, got, seqs, q, qc


# -- the weight table ---------------------------------------------------------------------------
@pytest.mark.parametrize("K,L,m", [(10, 150, 2), (1, 1, 1), (16, 512, 3), (10, 1024, 1), (4, 20, 20), (8, 64, 7)])
def test_log_u_table_matches_reference(K, L, m):
    table = log_u_table(K, L, m)
    cos = np.concatenate([np.linspace(-1, 1, 4001), 1 - np.logspace(-10, 0, 100), -1 + np.logspace(-10, 0, 100)])
    want = log_collision_probability(torch.tensor(cos), K, L, m).clamp_min(LOG_U_FLOOR).numpy()
    with np.errstate(divide="ignore"):
        got = table(K * np.log1p(-np.arccos(cos) / math.pi))
    # float32 table entries: absolute error of log u (= relative error of u) ~1e-6
    assert np.abs(got - want).max() < 1e-5


# -- equality with the reference -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 2, 3])
def test_random_gqa_matches_reference(backend, m):
    run_case(backend, H=2, G=4, d=64, K=6, L=30, m=m, lengths=(700,), seed=m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp16"])
def test_half_kv_matches_reference_on_rounded_values(backend, kv_dtype):
    run_case(backend, H=2, G=2, d=64, K=5, L=20, m=2, lengths=(900,), kv_dtype=kv_dtype, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,L,m", [(1, 8, 3), (16, 64, 1), (4, 1, 1), (8, 512, 2), (12, 40, 2), (13, 40, 1)])
def test_extreme_K_and_L(backend, K, L, m):
    # K=16 with m=1 and K=13 exercise the high-code byte of the bucket lists (K > 12).
    run_case(backend, H=1, G=2, d=16, K=K, L=L, m=m, lengths=(400,), seed=K * 7 + L)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unequal_batch_lengths_and_empty_sequence(backend):
    _, (out, lse, nc), _, _, _ = run_case(backend, H=2, G=3, d=32, K=5, L=16, m=2, lengths=(0, 1, 300, 2000), seed=3)
    assert torch.all(nc[0] == 0) and torch.all(torch.isneginf(lse[0])) and torch.all(out[0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skewed_buckets(backend):
    # keys clustered around a few centres with a shared offset: some buckets hold most keys
    run_case(backend, H=2, G=2, d=32, K=8, L=32, m=2, lengths=(3000,), clusters=3, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_and_token_by_token_appends_then_attend(backend):
    # 13 chunks of ~46 tokens: most stay in the unsorted tail, some cross the merge threshold
    run_case(backend, H=2, G=2, d=32, K=6, L=24, m=2, lengths=(600,), chunks=13, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_appends_after_attends(backend):
    gen = torch.Generator().manual_seed(8)
    H, G, d, K, L, m = 2, 2, 32, 5, 20, 2
    sh = SimHash(d, K, L, seed=2)
    store = CPUStore(H, d, K, L, m, kv_dtype="fp32", backend=backend)
    sid = store.add_sequence()
    ks, vs = [], []
    for step, t in enumerate([300, 1, 1, 7, 250, 1, 400]):
        k, v = make_tokens(gen, H, t, d)
        store.append(sid, k, v, sh.hash(k))
        ks.append(k)
        vs.append(v)
        k_all, v_all = torch.cat(ks, 1), torch.cat(vs, 1)
        q = torch.randn(1, H * G, d, generator=gen) + k_all[:, -1].repeat_interleave(G, 0)[None]
        qc = sh.hash(q)
        got = store.attend([sid], q, qc)
        assert_matches(got, reference(q, qc, k_all, v_all, sh.hash(k_all), K, L, m, "fp32"))
        assert store.length(sid) == k_all.shape[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_crossing_a_64k_block(backend):
    # 65,537+ tokens: candidates on both sides of the 65,535-token block boundary
    _, _, seqs, _, qc = run_case(backend, H=1, G=2, d=16, K=4, L=12, m=3, lengths=(65536 + 1500,), chunks=3,
                                 seed=21)
    mask = candidate_mask(qc, seqs[0][3][None], 3)[0]
    assert mask[:, :65535].any(-1).all() and mask[:, 65535:].any(-1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_bucket_holding_more_than_a_block(backend):
    # every token in bucket 0 of every table: the bucket offsets of a full block reach its size
    H, G, d, K, L, n = 1, 2, 8, 3, 2, 65535 + 10
    gen = torch.Generator().manual_seed(5)
    k, v = make_tokens(gen, H, n, d)
    kc = torch.zeros(H, n, L, dtype=torch.int32)
    store = CPUStore(H, d, K, L, 1, kv_dtype="fp32", backend=backend)
    sid = store.add_sequence()
    store.append(sid, k, v, kc)
    q = torch.randn(1, H * G, d, generator=gen)
    qc = torch.zeros(1, H * G, L, dtype=torch.int32)
    got = store.attend([sid], q, qc)
    assert torch.all(got[2] == n)
    assert_matches(got, reference(q, qc, k, v, kc, K, L, 1, "fp32"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_candidates(backend):
    H, G, d, K, L = 1, 2, 16, 3, 4
    store = CPUStore(H, d, K, L, 2, kv_dtype="fp32", backend=backend)
    sid = store.add_sequence()
    k = torch.randn(H, 50, d)
    store.append(sid, k, torch.randn(H, 50, d), torch.zeros(H, 50, L, dtype=torch.int32))
    q = torch.randn(1, H * G, d)
    qc = torch.full((1, H * G, L), 5, dtype=torch.int32)
    qc[0, 0, 0] = 0  # one collision < m = 2
    out, lse, nc = store.attend([sid], q, qc)
    assert torch.all(nc == 0) and torch.all(torch.isneginf(lse)) and torch.all(out == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_keys_identical(backend):
    H, G, d, K, L, m = 1, 2, 32, 6, 20, 2
    gen = torch.Generator().manual_seed(3)
    sh = SimHash(d, K, L, seed=9)
    store = CPUStore(H, d, K, L, m, kv_dtype="bf16", backend=backend)
    sid = store.add_sequence()
    n = 1000
    k = torch.randn(H, 1, d, generator=gen).expand(H, n, d).contiguous()
    v = torch.randn(H, n, d, generator=gen)
    kc = sh.hash(k)
    store.append(sid, k, v, kc)
    q = torch.cat([k[:, :1] * 2, torch.randn(H, 1, d, generator=gen)], 1).reshape(1, H * G, d)
    qc = sh.hash(q)
    got = store.attend([sid], q, qc)
    assert_matches(got, reference(q, qc, k, v, kc, K, L, m, "bf16"))
    assert got[2][0, 0] == n  # the aligned query collides everywhere with every key


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token(backend):
    run_case(backend, H=2, G=2, d=8, K=2, L=6, m=1, lengths=(1,), seed=6)


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_sequence_frees_memory(backend):
    H, d, K, L = 2, 32, 6, 16
    store = CPUStore(H, d, K, L, kv_dtype="bf16", backend=backend)
    a, b = store.add_sequence(), store.add_sequence()
    for sid, n in ((a, 3000), (b, 1000)):
        k = torch.randn(H, n, d)
        store.append(sid, k, torch.randn(H, n, d), torch.randint(0, 1 << K, (H, n, L)))
    total, held_a = store.nbytes(), store.nbytes(a)
    assert held_a >= 2 * H * 3000 * d * 2  # at least its bf16 K and V
    store.remove_sequence(a)
    assert store.nbytes() <= total - held_a + 64
    with pytest.raises(ValueError, match="unknown sequence"):
        store.attend([a], torch.randn(1, H, d), torch.zeros(1, H, L, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown sequence"):
        store.remove_sequence(a)


@pytest.mark.skipif(not extension_available(), reason="extension not built")
def test_index_and_norms_at_most_065x_of_bf16_kv():
    # K=10, L=150, d=128: ids are 2 bytes per table per token; bucket offsets are per block.
    H, d, K, L, n = 1, 128, 10, 150, 65535
    store = CPUStore(H, d, K, L, kv_dtype="bf16", backend="cpp")
    sid = store.add_sequence()
    gen = torch.Generator().manual_seed(0)
    store.append(sid, torch.randn(H, n, d, generator=gen, dtype=torch.bfloat16),
                 torch.randn(H, n, d, generator=gen, dtype=torch.bfloat16),
                 torch.randint(0, 1 << K, (H, n, L), generator=gen, dtype=torch.int32))
    kv = 2 * H * n * d * 2
    ratio = (store.nbytes(sid) - kv) / kv
    assert ratio <= 0.65, ratio


# -- async, SIMD levels, backends agree ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_attend_async_while_python_works(backend):
    gen = torch.Generator().manual_seed(12)
    H, G, d, K, L, m = 2, 4, 64, 6, 40, 2
    sh = SimHash(d, K, L, seed=3)
    store = CPUStore(H, d, K, L, m, backend=backend)
    sids = [store.add_sequence() for _ in range(3)]
    for sid in sids:
        k, v = make_tokens(gen, H, 20000, d)
        store.append(sid, k, v, sh.hash(k))
    q = torch.randn(3, H * G, d, generator=gen)
    qc = sh.hash(q)
    sync = store.attend(sids, q, qc)
    handle = store.attend_async(sids, q, qc)
    busy = 0
    while not handle.done() and busy < 10**7:  # Python keeps running while the store works
        busy += 1
    got = handle.wait()
    for a, b in zip(got, sync):
        assert torch.equal(a, b)
    # several in flight from another thread at once still give the same answers
    results = []
    thread = threading.Thread(target=lambda: results.append(store.attend(sids, q, qc)))
    thread.start()
    got2 = store.attend_async(sids, q, qc).wait()
    thread.join()
    for a, b, c in zip(got2, results[0], sync):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.skipif(not extension_available(), reason="extension not built")
def test_every_simd_level_matches_reference():
    from magicpig import _C

    levels = ["scalar", "avx2", "avx512"]
    best = levels.index(_C.cpu_info()["simd_supported"])
    start = _C.cpu_info()["simd"]
    try:
        for level in levels[: best + 1]:
            _C.set_simd(level)
            assert _C.cpu_info()["simd"] == level
            # d = 40 is not a multiple of the vector width: the remainder paths run too
            for kv_dtype in ("bf16", "fp16", "fp32"):
                run_case("cpp", H=2, G=3, d=40, K=5, L=20, m=2, lengths=(800, 50), kv_dtype=kv_dtype, chunks=2,
                         seed=best)
    finally:
        _C.set_simd(start)


@pytest.mark.skipif(not extension_available(), reason="extension not built")
def test_cpp_and_numba_agree():
    gen = torch.Generator().manual_seed(1)
    H, G, d, K, L, m = 2, 2, 48, 7, 50, 2
    sh = SimHash(d, K, L, seed=4)
    stores = [CPUStore(H, d, K, L, m, backend=b) for b in ("cpp", "numba")]
    k, v = make_tokens(gen, H, 5000, d, clusters=4)
    kc = sh.hash(k)
    for s in stores:
        sid = s.add_sequence()
        s.append(sid, k, v, kc)
    q = torch.randn(1, H * G, d, generator=gen) + k[:, 7].repeat_interleave(G, 0)[None]
    qc = sh.hash(q)
    (o1, l1, n1), (o2, l2, n2) = (s.attend([0], q, qc) for s in stores)
    assert torch.equal(n1, n2) and n1.min() > 0
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)


def test_inputs_may_be_numpy_bf16_tensors_and_views():
    gen = torch.Generator().manual_seed(2)
    H, G, d, K, L = 2, 2, 16, 4, 10
    sh = SimHash(d, K, L, seed=1)
    k, v = make_tokens(gen, H, 200, d)
    kc = sh.hash(k)
    a = CPUStore(H, d, K, L)
    b = CPUStore(H, d, K, L)
    sa, sb = a.add_sequence(), b.add_sequence()
    a.append(sa, k.bfloat16(), v.bfloat16(), kc)
    # numpy float32 input and a non-contiguous view of int64 codes
    b.append(sb, k.numpy(), v.numpy(), kc.long().transpose(0, 1).contiguous().transpose(0, 1))
    q = torch.randn(1, H * G, d, generator=gen)
    qc = sh.hash(q)
    # a bf16 query is upcast: same answer as its fp32 value given as numpy
    ra = a.attend([sa], q.bfloat16(), qc)
    rb = b.attend(np.array([sb]), q.bfloat16().float().numpy(), qc.numpy())
    assert ra[2].min() > 0
    for x, y in zip(ra, rb):
        assert torch.equal(x, y)


# -- validation --------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    H, d, K, L = 2, 16, 4, 8
    store = CPUStore(H, d, K, L)
    sid = store.add_sequence()
    k = torch.randn(H, 5, d)
    codes = torch.zeros(H, 5, L, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"keys: expected shape \[num_kv_heads, t, head_dim\]"):
        store.append(sid, torch.randn(H + 1, 5, d), k, codes)
    with pytest.raises(ValueError, match="values: expected shape"):
        store.append(sid, k, torch.randn(H, 4, d), codes)
    with pytest.raises(ValueError, match="key_codes: expected shape"):
        store.append(sid, k, k, torch.zeros(H, 5, L + 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"key_codes: codes must be in \[0, 2\^K = 16\)"):
        store.append(sid, k, k, codes + 16)
    with pytest.raises(ValueError, match="key_codes: codes must be in"):
        store.append(sid, k, k, codes - 1)
    with pytest.raises(TypeError, match="key_codes: expected an integer array"):
        store.append(sid, k, k, codes.float())
    with pytest.raises(TypeError, match="keys: expected a floating-point array"):
        store.append(sid, k.int(), k, codes)
    with pytest.raises(TypeError, match="keys: expected a numpy array or a torch tensor"):
        store.append(sid, k.tolist(), k, codes)
    with pytest.raises(ValueError, match="keys: expected a CPU tensor"):
        store.append(sid, torch.empty(H, 5, d, device="meta"), k, codes)
    with pytest.raises(ValueError, match="seq_id=99: unknown sequence"):
        store.append(99, k, k, codes)
    with pytest.raises(TypeError, match="seq_id"):
        store.append("0", k, k, codes)
    store.append(sid, k, k, codes)
    q = torch.randn(1, 2 * H, d)
    qc = torch.zeros(1, 2 * H, L, dtype=torch.int32)
    with pytest.raises(ValueError, match="queries: Hq=3 query heads must be a positive multiple"):
        store.attend([sid], torch.randn(1, 3, d), torch.zeros(1, 3, L, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"queries: expected shape \[B=2, Hq, head_dim\]"):
        store.attend([sid, sid], q, qc)
    with pytest.raises(ValueError, match="query_codes: expected shape"):
        store.attend([sid], q, qc[:, :, :-1])
    with pytest.raises(ValueError, match="query_codes: codes must be in"):
        store.attend([sid], q, qc + 100)
    with pytest.raises(ValueError, match="queries: expected finite"):
        store.attend([sid], q * float("nan"), qc)
    with pytest.raises(ValueError, match="seq_ids=7: unknown sequence"):
        store.attend([7], q, qc)
    for kwargs, match in [
        (dict(K=0), "K=0"), (dict(K=21), "K=21"), (dict(L=0), "L=0"), (dict(L=1025), "L=1025"),
        (dict(min_collisions=9), "min_collisions=9"), (dict(kv_dtype="int8"), "kv_dtype='int8'"),
        (dict(backend="gpu"), "backend='gpu'"), (dict(num_threads=0), "num_threads=0"),
    ]:
        args = dict(num_kv_heads=H, head_dim=d, K=K, L=L)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            CPUStore(**args)
    with pytest.raises(TypeError, match="head_dim"):
        CPUStore(H, 16.0, K, L)


def test_auto_backend_falls_back_to_numba_without_extension(monkeypatch):
    import magicpig.store.cpu_store as cpu_store

    monkeypatch.setattr(cpu_store, "_C", None)
    assert CPUStore(1, 8, 3, 4).backend == "numba"
    with pytest.raises(RuntimeError, match="extension magicpig._C is not built"):
        CPUStore(1, 8, 3, 4, backend="cpp")
