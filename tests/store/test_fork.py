"""CPUStore.fork and CPUStore.read (prefix sharing for prefix caching), both backends.

A fork sees the first `tokens` tokens of its source, then its own appends. Every case checks it
against a fresh sequence of the same store holding the same tokens (the C++ fork shares the
source's blocks and may see a block only in part, so this is what tests the kernel's
visibility filter) and against the torch reference on those tokens. The source's tokens a fork
must not see are made adversarial: huge values, and queries equal to them, so any leak shows.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from test_store import BACKENDS, TORCH_DTYPE, assert_matches, make_tokens, reference

from magicpig.attention.reference import candidate_mask, carried_head, hybrid_attention, top_candidates
from magicpig.lsh import SimHash
from magicpig.store import CPUStore, extension_available

needs_ext = pytest.mark.skipif(not extension_available(), reason="extension not built")
H, G, D, K, L, M = 2, 2, 32, 5, 20, 2
SH = SimHash(D, K, L, seed=7)
# The source's appends: the first two are merged into its CSR (>= 256 tokens), the third waits
# in the unsorted tail, so a fork inside the CSR part and one inside the tail both occur.
SOURCE_CHUNKS = (1000, 300, 200)
HIDDEN = 1100  # source tokens from here on are adversarial (huge values)


class Mirror:
    """A store and, per sequence, the keys, values and codes it should hold."""

    def __init__(self, backend: str, kv_dtype: str = "fp32", exact: int = 0, carry: bool = False):
        self.store = CPUStore(H, D, K, L, M, kv_dtype=kv_dtype, backend=backend, exact_keys=exact, carry_head=carry)
        self.kv_dtype, self.exact = kv_dtype, exact
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add(self) -> int:
        sid = self.store.add_sequence()
        self.held[sid] = (torch.zeros(H, 0, D), torch.zeros(H, 0, D), torch.zeros(H, 0, L, dtype=torch.int32))
        return sid

    def append(self, sid: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kc = SH.hash(k)
        self.store.append(sid, k, v, kc)
        self.held[sid] = tuple(torch.cat([a, b], 1) for a, b in zip(self.held[sid], (k, v, kc)))

    def fork(self, sid: int, tokens: int) -> int:
        new = self.store.fork(sid, tokens)
        assert self.store.length(new) == tokens
        self.held[new] = tuple(x[:, :tokens] for x in self.held[sid])
        return new

    def fresh(self, sid: int) -> int:
        """A new sequence holding sid's tokens, appended at once."""
        new = self.add()
        k, v, _ = self.held[sid]
        if k.shape[1]:
            self.append(new, k, v)
        return new

    def attend(self, sid: int, q: torch.Tensor):
        return self.store.attend([sid], q, SH.hash(q))

    def reference(self, sid: int, q: torch.Tensor):
        k, v, kc = self.held[sid]
        return reference(q, SH.hash(q), k, v, kc, K, L, M, self.kv_dtype)


def source_tokens(gen, n: int = sum(SOURCE_CHUNKS)):
    """Keys and values of a source; tokens from HIDDEN on have 8x keys and 1000x values."""
    k, v = make_tokens(gen, H, n, D)
    k[:, HIDDEN:] *= 8
    v[:, HIDDEN:] *= 1000
    return k, v


def add_source(mirror: Mirror, gen) -> int:
    sid = mirror.add()
    k, v = source_tokens(gen)
    start = 0
    for size in SOURCE_CHUNKS:
        mirror.append(sid, k[:, start : start + size], v[:, start : start + size])
        start += size
    return sid


def probing_queries(gen, mirror: Mirror, sid: int, hidden: torch.Tensor) -> torch.Tensor:
    """[1, Hq, d]: per KV head, one query near a key the sequence holds and one equal to a key it
    must not see (hidden [H, d]), which collides with that key in every table."""
    k = mirror.held[sid][0]
    q = torch.randn(1, H * G, D, generator=gen)
    for h in range(H):
        if k.shape[1]:
            q[0, h * G] += 2 * k[h, torch.randint(0, k.shape[1], (1,), generator=gen).item()]
        q[0, h * G + 1] = hidden[h]
    return q


def check_as_fresh(mirror: Mirror, sid: int, q: torch.Tensor, exact: bool) -> None:
    """sid's attend equals a fresh sequence's of the same tokens (bit for bit when `exact`, else
    to float summation: the C++ fork's own tokens are in blocks of their own) and the reference."""
    got = mirror.attend(sid, q)
    fresh = mirror.fresh(sid)
    want = mirror.attend(fresh, q)
    assert torch.equal(got[2], want[2]), f"candidate counts differ from a fresh sequence: {got[2]} vs {want[2]}"
    if exact:
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if mirror.held[sid][0].shape[1]:
        assert_matches(got, mirror.reference(sid, q))
    else:
        assert torch.all(got[2] == 0) and torch.all(torch.isneginf(got[1]))
    mirror.store.remove_sequence(fresh)


# -- attends over forks ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1234, 1400, 0, 1500])  # inside the CSR part, inside the tail, ends
def test_fork_attends_as_a_fresh_sequence(backend, tokens):
    gen = torch.Generator().manual_seed(tokens)
    mirror = Mirror(backend)
    src = add_source(mirror, gen)
    fork = mirror.fork(src, tokens)
    later_k, later_v = source_tokens(gen, 400)  # appended to the source after the fork: hidden too
    later_k *= 8
    later_v *= 1000
    mirror.append(src, later_k, later_v)
    hidden = mirror.held[src][0][:, max(tokens, HIDDEN) + 7]  # a source token past the fork's view
    q = probing_queries(gen, mirror, fork, hidden)
    check_as_fresh(mirror, fork, q, exact=True)  # one (shared) block: the same candidates in order
    for size in (40, 300):  # the fork's own tokens: first in the tail, then merged
        k, v = make_tokens(gen, H, size, D)
        mirror.append(fork, k, v)
        check_as_fresh(mirror, fork, probing_queries(gen, mirror, fork, hidden), exact=backend == "numba")
    # the source still sees all of its tokens, the fork's appends none
    check_as_fresh(mirror, src, probing_queries(gen, mirror, src, mirror.held[fork][0][:, -1]),
                   exact=backend == "numba")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_of_a_fork(backend):
    gen = torch.Generator().manual_seed(3)
    mirror = Mirror(backend)
    src = add_source(mirror, gen)
    first = mirror.fork(src, 1300)
    k, v = make_tokens(gen, H, 500, D)
    k[:, 150:] *= 8  # the first fork's own tokens that the second does not see
    v[:, 150:] *= 1000
    mirror.append(first, k, v)
    second = mirror.fork(first, 1450)  # inside the first fork's own block
    third = mirror.fork(second, 1250)  # inside the block the three share with the source
    mirror.append(second, *make_tokens(gen, H, 30, D))
    mirror.append(third, *make_tokens(gen, H, 20, D))
    for sid, hidden in ((second, mirror.held[first][0][:, 1460]), (third, mirror.held[src][0][:, 1280])):
        check_as_fresh(mirror, sid, probing_queries(gen, mirror, sid, hidden), exact=backend == "numba")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_keys_identical(backend):
    """Every key collides with an aligned query: the fork's candidates are exactly its tokens."""
    gen = torch.Generator().manual_seed(4)
    mirror = Mirror(backend, kv_dtype="bf16")
    key = torch.randn(H, 1, D, generator=gen)
    src = mirror.add()
    mirror.append(src, key.expand(H, 800, D).contiguous(), torch.randn(H, 800, D, generator=gen) * 100)
    fork = mirror.fork(src, 500)
    mirror.append(src, key.expand(H, 100, D).contiguous(), torch.randn(H, 100, D, generator=gen) * 100)
    mirror.append(fork, key.expand(H, 60, D).contiguous(), torch.randn(H, 60, D, generator=gen))
    q = (key * 2).transpose(0, 1).repeat_interleave(G, 1)  # [1, Hq, d]
    out, lse, ncand = mirror.attend(fork, q)
    assert torch.all(ncand == 560)
    assert_matches((out, lse, ncand), mirror.reference(fork, q))
    check_as_fresh(mirror, fork, q, exact=backend == "numba")


def reference_steps(mirror: Mirror, sid: int, q: torch.Tensor, last: torch.Tensor | None, blocks: list[int]):
    """The carried-head reference of one decode step (see test_carry_head.py) over sid's tokens,
    the store's blocks of the sequence at `blocks` (their first positions): (out, lse, keys
    read), and the step's head."""
    k, v, kc = mirror.held[sid]
    kr = k.to(TORCH_DTYPE[mirror.kv_dtype]).float()[None]
    vr = v.to(TORCH_DTYPE[mirror.kv_dtype]).float()[None]
    n = kr.shape[2]
    mask = candidate_mask(SH.hash(q), kc[None], M)
    last = torch.zeros_like(mask) if last is None else torch.nn.functional.pad(last, (0, n - last.shape[-1]))
    head = carried_head(q, kr, mask, last, mirror.exact)
    kept = torch.zeros_like(mask)  # the candidates each block keeps for the head
    for lo, hi in zip(blocks, blocks[1:] + [n]):
        part = torch.zeros_like(mask)
        part[..., lo:hi] = True
        kept |= top_candidates(q, kr, mask & part, mirror.exact)
    out, lse = hybrid_attention(q, kr, vr, mask, head, K, L, M)
    return (out, lse, (mask.sum(-1) + (last & ~kept).sum(-1)).to(torch.int32)), head


@pytest.mark.parametrize("backend", BACKENDS)
def test_carried_head_of_a_fork_never_holds_a_hidden_token(backend):
    """carry_head: the source's head (made of tokens the fork does not see) is not the fork's,
    and the fork's own heads, over decode steps with appends to both, match the reference."""
    gen = torch.Generator().manual_seed(5)
    mirror = Mirror(backend, kv_dtype="bf16", exact=6, carry=True)
    src = add_source(mirror, gen)
    hidden = mirror.held[src][0][:, 1450]
    q_hidden = probing_queries(gen, mirror, src, hidden)
    for _ in range(2):  # the source's last head now holds token 1450
        mirror.attend(src, q_hidden)
    fork = mirror.fork(src, 1200)
    last, blocks = None, [0]
    for step in range(6):
        k, v = make_tokens(gen, H, 3, D)
        mirror.append(src, k * 8, v * 1000)
        if step:  # the fork's own tokens: a block of its own in the C++ store
            if len(blocks) == 1 and backend == "cpp":
                blocks.append(mirror.store.length(fork))
            mirror.append(fork, *make_tokens(gen, H, 3, D))
        q = probing_queries(gen, mirror, fork, hidden)
        got = mirror.attend(fork, q)
        want, last = reference_steps(mirror, fork, q, last, blocks)
        assert_matches(got, want)


# -- read ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp16", "fp32"])
def test_read_returns_the_stored_values(backend, kv_dtype):
    gen = torch.Generator().manual_seed(6)
    mirror = Mirror(backend, kv_dtype=kv_dtype)
    src = add_source(mirror, gen)
    fork = mirror.fork(src, 1234)
    mirror.append(fork, *make_tokens(gen, H, 50, D))
    mirror.append(src, *make_tokens(gen, H, 70, D))
    dtype = TORCH_DTYPE[kv_dtype]
    for sid, start, end in ((fork, 1200, 1260), (fork, 0, 1284), (src, 1230, 1570), (fork, 1234, 1234),
                            (src, 0, 1)):
        keys, values = mirror.store.read(sid, start, end)
        assert keys.dtype == values.dtype == dtype and keys.shape == (H, end - start, D)
        k, v, _ = mirror.held[sid]
        assert torch.equal(keys, k[:, start:end].to(dtype)) and torch.equal(values, v[:, start:end].to(dtype))


# -- copy-on-write and memory ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_appends_and_removals_leave_the_other_sequence_unchanged(backend):
    gen = torch.Generator().manual_seed(8)
    mirror = Mirror(backend)
    store = mirror.store
    empty = store.nbytes()
    src = add_source(mirror, gen)
    forks = [mirror.fork(src, 1234), mirror.fork(src, 1500)]  # the second shares the whole last block
    q = probing_queries(gen, mirror, forks[0], mirror.held[src][0][:, 1300])
    before = [mirror.attend(f, q) for f in forks]
    held = [store.nbytes(f) for f in forks]
    for size in (1, 400, 3):  # the source appends into blocks of its own
        mirror.append(src, *make_tokens(gen, H, size, D))
    for size in (2, 300):  # so does the fork that saw the source's whole block
        mirror.append(forks[1], *make_tokens(gen, H, size, D))
    assert all(torch.equal(a, b) for a, b in zip(mirror.attend(forks[0], q), before[0]))
    if backend == "cpp":  # the shared blocks did not grow
        assert store.nbytes(forks[0]) == held[0]
    store.remove_sequence(src)
    assert all(torch.equal(a, b) for a, b in zip(mirror.attend(forks[0], q), before[0]))
    keys, values = store.read(forks[0], 0, 1234)
    assert torch.equal(keys, mirror.held[forks[0]][0]) and torch.equal(values, mirror.held[forks[0]][1])
    check_as_fresh(mirror, forks[1], q, exact=backend == "numba")
    for f in forks:
        store.remove_sequence(f)
    assert store.nbytes() == empty


@needs_ext
def test_a_fork_shares_its_prefix_memory():
    gen = torch.Generator().manual_seed(9)
    store = CPUStore(2, 64, 10, 40, kv_dtype="bf16", backend="cpp")
    src = store.add_sequence()
    k, v = make_tokens(gen, 2, 20000, 64)
    store.append(src, k, v, torch.randint(0, 1 << 10, (2, 20000, 40), generator=gen, dtype=torch.int32))
    source_bytes, before = store.nbytes(src), store.nbytes()
    forks = [store.fork(src, 15000), store.fork(src, 20000)]
    assert store.nbytes() - before < 0.05 * source_bytes
    assert all(store.nbytes(f) >= source_bytes for f in forks)  # a sequence's figure counts its shared blocks
    store.remove_sequence(src)
    assert store.nbytes() > 0.95 * source_bytes  # the forks keep the blocks


# -- concurrency ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, attends", [pytest.param("cpp", 300, marks=needs_ext), ("numba", 20)])
def test_source_appends_while_the_fork_attends(backend, attends):
    """One thread appends to the source (token by token and in chunks, so its tail merges) and
    forks and removes forks of it; another attends a fork over and over: every result is the
    quiet store's, and every fork read back holds the source's tokens."""
    gen = torch.Generator().manual_seed(10)
    mirror = Mirror(backend)
    store = mirror.store
    src = add_source(mirror, gen)
    fork = mirror.fork(src, 1400)
    q = probing_queries(gen, mirror, fork, mirror.held[src][0][:, 1450])
    qc = SH.hash(q)
    want = store.attend([fork], q, qc)
    chunks = [make_tokens(gen, H, size, D) for size in [1, 2, 30, 1, 300, 5] * 20]
    codes = [SH.hash(k) for k, _ in chunks]
    done, wrong, errors = threading.Event(), [0], []

    def attend():
        try:
            for _ in range(attends):
                got = store.attend([fork], q, qc)
                wrong[0] += not all(torch.equal(a, b) for a, b in zip(got, want))
        finally:
            done.set()

    def append_and_fork():
        try:
            held = mirror.held[src][0]
            for i, ((k, v), kc) in enumerate(zip(chunks, codes)):
                if done.is_set():
                    break
                store.append(src, k, v, kc)
                held = torch.cat([held, k], 1)
                if i % 3 == 0:  # a fork seeing the whole source, gone again before the next append
                    f = store.fork(src, held.shape[1])
                    keys, _ = store.read(f, 1000, held.shape[1])
                    assert torch.equal(keys, held[:, 1000:])
                    store.remove_sequence(f)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=attend), threading.Thread(target=append_and_fork)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and time.monotonic() - t0 < 60
    assert not errors, errors
    assert wrong[0] == 0, f"{wrong[0]} of {attends} attends of the fork changed while the source grew"


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_name_the_argument(backend):
    store = CPUStore(H, D, K, L, M, backend=backend)
    sid = store.add_sequence()
    k = torch.randn(H, 10, D)
    store.append(sid, k, k, SH.hash(k))
    for tokens, error in ((-1, ValueError), (11, ValueError), ("3", TypeError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"tokens={tokens!r}"):
            store.fork(sid, tokens)
    with pytest.raises(ValueError, match="seq_id=5: unknown sequence"):
        store.fork(5, 0)
    with pytest.raises(TypeError, match="seq_id"):
        store.read("0", 0, 1)
    for (start, end), name in (((-1, 2), "start"), ((3, 2), "end"), ((0, 11), "end"), ((11, 11), "start")):
        with pytest.raises(ValueError, match=f"{name}="):
            store.read(sid, start, end)
    with pytest.raises(TypeError, match="start"):
        store.read(sid, 0.0, 1)
    assert store.length(sid) == 10 and store.nbytes() > 0


@needs_ext
def test_extension_checks_its_own_arguments():
    """magicpig._C may be called directly: bad ranges and buffers raise, naming the argument."""
    store = CPUStore(H, D, K, L, M, kv_dtype="fp32", backend="cpp")
    impl, sid = store._impl, store.add_sequence()
    k = torch.randn(H, 10, D)
    store.append(sid, k, k, SH.hash(k))
    for tokens in (-1, 11):
        with pytest.raises(ValueError, match=f"tokens={tokens}"):
            impl.fork(sid, tokens)
    with pytest.raises(IndexError, match="unknown seq_id 9"):
        impl.fork(9, 0)
    buf = np.empty((H, 2, D), np.float32)
    with pytest.raises(ValueError, match="end=12"):
        impl.read(sid, 10, 12, buf, buf.copy())
    with pytest.raises(ValueError, match="start=-1"):
        impl.read(sid, -1, 1, buf, buf.copy())
    with pytest.raises(ValueError, match="end=1"):
        impl.read(sid, 3, 1, buf, buf.copy())
    with pytest.raises(ValueError, match="keys: expected"):
        impl.read(sid, 0, 3, buf, buf.copy())
    with pytest.raises(ValueError, match="values: expected"):
        impl.read(sid, 0, 2, buf, np.empty((H, 2, D), np.float16))
    out = buf.copy()
    impl.read(sid, 0, 2, buf, out)
    assert np.array_equal(buf, k[:, :2].numpy()) and np.array_equal(out, k[:, :2].numpy())
