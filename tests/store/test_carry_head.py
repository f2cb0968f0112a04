"""The carried head (MagicPIGConfig.carry_head): the exact head is chosen among this step's
candidates and the last step's head of the same sequence and query head, so a key the hashes
miss at one step but held the attention at the last is still attended exactly.

The stores are run for several decode steps (queries drifting, tokens appended between steps)
against the torch reference: carried_head picks the head, hybrid_attention attends, and the
keys read are the candidates plus the carried keys not among the candidates each block keeps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_store import BACKENDS, TORCH_DTYPE, assert_matches, make_tokens

from magicpig.attention.reference import candidate_mask, carried_head, hybrid_attention, top_candidates
from magicpig.config import MagicPIGConfig
from magicpig.eval.runner import parse_method
from magicpig.lsh import SimHash
from magicpig.store import CPUStore


class ReferenceSequence:
    """One sequence decoded by the reference: its tokens and its last head."""

    def __init__(self, k, v, kc):
        self.k, self.v, self.kc = k, v, kc
        self.last_head = None

    def append(self, k, v, kc):
        self.k, self.v, self.kc = (torch.cat([a, b], 1) for a, b in ((self.k, k), (self.v, v), (self.kc, kc)))

    def attend(self, q, qc, K, L, m, exact, kv_dtype, block=65535):
        """q [1, Hq, d]: (out, lse, keys read) and what the step's head does with carried keys."""
        kr = self.k.to(TORCH_DTYPE[kv_dtype]).float()[None]
        vr = self.v.to(TORCH_DTYPE[kv_dtype]).float()[None]
        n = kr.shape[2]
        mask = candidate_mask(qc, self.kc[None], m)
        last = torch.zeros_like(mask) if self.last_head is None else _widen(self.last_head, n)
        head = carried_head(q, kr, mask, last, exact)
        kept = torch.zeros_like(mask)  # the candidates each 64k block keeps for the head
        for start in range(0, n, block):
            part = torch.zeros_like(mask)
            part[..., start : start + block] = True
            kept |= top_candidates(q, kr, mask & part, exact)
        out, lse = hybrid_attention(q, kr, vr, mask, head, K, L, m)
        read = mask.sum(-1) + (last & ~kept).sum(-1)
        events = {"carried_non_candidate_in_head": bool((head & last & ~mask).any()),
                  "carried_candidate_not_kept": bool((last & mask & ~kept).any())}
        self.last_head = head
        return (out, lse, read.to(torch.int32)), events


def _widen(head, n):
    """A head over fewer tokens, padded with False to n tokens (tokens appended since)."""
    return torch.nn.functional.pad(head, (0, n - head.shape[-1]))


def drifting_queries(gen, k, G, steps, integer=False):
    """[steps][1, Hq, d]: each query head starts near a key and drifts; every third step it
    jumps near another key (so last step's head keys stop being candidates or stop ranking)."""
    H, n, d = k.shape
    heads = torch.arange(H * G) // G
    q = k[heads, torch.randint(0, n, (H * G,), generator=gen)] * 2
    out = []
    for step in range(steps):
        if step % 3 == 2:
            q = k[heads, torch.randint(0, n, (H * G,), generator=gen)] * 2
        q = q + 0.4 * torch.randn(q.shape, generator=gen)
        out.append(q[None].clone())
    return out


def run_steps(backend, *, H=2, G=4, d=32, K=5, L=20, m=2, n=900, exact=8, steps=9, kv_dtype="fp32", seed=0,
              append_every=1, store_threads=None):
    gen = torch.Generator().manual_seed(seed)
    sh = SimHash(d, K, L, seed=seed + 1)
    k, v = make_tokens(gen, H, n, d)
    store = CPUStore(H, d, K, L, m, kv_dtype=kv_dtype, backend=backend, exact_keys=exact, carry_head=True,
                     num_threads=store_threads)
    sid = store.add_sequence()
    store.append(sid, k, v, sh.hash(k))
    ref = ReferenceSequence(k, v, sh.hash(k))
    seen = {"carried_non_candidate_in_head": False, "carried_candidate_not_kept": False}
    for step, q in enumerate(drifting_queries(gen, k, G, steps)):
        if append_every and step and step % append_every == 0:  # new tokens land in the unsorted tail
            k1, v1 = make_tokens(gen, H, 3, d)
            store.append(sid, k1, v1, sh.hash(k1))
            ref.append(k1, v1, sh.hash(k1))
        qc = sh.hash(q)
        want, events = ref.attend(q, qc, K, L, m, exact, kv_dtype)
        assert_matches(store.attend([sid], q, qc), want)
        seen = {key: seen[key] or events[key] for key in seen}
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_matches_reference_over_decode_steps(backend):
    seen = run_steps(backend, kv_dtype="bf16", seed=3)
    # the case tests something: carried keys the hashes missed made the head, and carried keys
    # that were candidates but not kept stayed in the weighted sample only
    assert seen == {"carried_non_candidate_in_head": True, "carried_candidate_not_kept": True}


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_matches_reference_with_split_groups_and_a_large_head(backend):
    # G = 10: two sub-groups of the kernel; a head as large as many candidate sets
    run_steps(backend, H=1, G=10, d=16, K=4, L=12, m=2, n=500, exact=40, steps=6, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_carried_keys_across_64k_blocks(backend):
    seen = run_steps(backend, H=1, G=2, d=16, K=4, L=12, m=3, n=65535 + 1500, exact=6, steps=6, seed=21,
                     append_every=0)
    assert seen["carried_non_candidate_in_head"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_matches_reference_with_several_threads(backend):
    run_steps(backend, steps=5, seed=8, store_threads=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sequence_carries_its_own_head(backend):
    """Two sequences in one batch, then one named twice: both of its rows carry the same head
    (read before either is written) and the later row's head is the one kept."""
    gen = torch.Generator().manual_seed(11)
    H, G, d, K, L, m, n, E = 1, 2, 16, 4, 10, 2, 400, 5
    sh = SimHash(d, K, L, seed=12)
    store = CPUStore(H, d, K, L, m, kv_dtype="fp32", backend=backend, exact_keys=E, carry_head=True)
    refs, sids = [], []
    for _ in range(2):
        k, v = make_tokens(gen, H, n, d)
        sids.append(store.add_sequence())
        store.append(sids[-1], k, v, sh.hash(k))
        refs.append(ReferenceSequence(k, v, sh.hash(k)))
    qs = [drifting_queries(gen, ref.k, G, 4) for ref in refs]
    for step in range(3):
        q = torch.cat([qs[0][step], qs[1][step]])
        qc = sh.hash(q)
        got = store.attend(sids, q, qc)
        for row in range(2):
            want, _ = refs[row].attend(q[row : row + 1], qc[row : row + 1], K, L, m, E, "fp32")
            assert_matches(tuple(x[row : row + 1] for x in got), want)
    q = torch.cat([qs[0][3], qs[1][3]])  # sequence 0 twice, with two queries
    qc = sh.hash(q)
    got = store.attend([sids[0], sids[0]], q, qc)
    last = refs[0].last_head
    for row in range(2):
        refs[0].last_head = last
        want, _ = refs[0].attend(q[row : row + 1], qc[row : row + 1], K, L, m, E, "fp32")
        assert_matches(tuple(x[row : row + 1] for x in got), want)
    q = qs[0][3]  # the next step: the head kept is row 1's (its last_head in the reference)
    qc = sh.hash(q)
    want, _ = refs[0].attend(q, qc, K, L, m, E, "fp32")
    assert_matches(store.attend([sids[0]], q, qc), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_sequence_starts_without_a_head(backend):
    gen = torch.Generator().manual_seed(4)
    H, G, d, K, L, m, n, E = 1, 2, 16, 4, 10, 1, 300, 4
    sh = SimHash(d, K, L, seed=2)
    k, v = make_tokens(gen, H, n, d)
    store = CPUStore(H, d, K, L, m, kv_dtype="fp32", backend=backend, exact_keys=E, carry_head=True)
    plain = CPUStore(H, d, K, L, m, kv_dtype="fp32", backend=backend, exact_keys=E)
    q = drifting_queries(gen, k, G, 2)
    old = store.add_sequence()
    store.append(old, k, v, sh.hash(k))
    store.attend([old], q[0], sh.hash(q[0]))
    store.remove_sequence(old)
    new, ref = store.add_sequence(), plain.add_sequence()
    for s, sid in ((store, new), (plain, ref)):
        s.append(sid, k, v, sh.hash(k))
    for a, b in zip(store.attend([new], q[1], sh.hash(q[1])), plain.attend([ref], q[1], sh.hash(q[1]))):
        assert torch.equal(a, b)


def test_carry_head_needs_an_exact_head_and_a_bool():
    with pytest.raises(ValueError, match="carry_head.*exact_keys > 0"):
        MagicPIGConfig(carry_head=True)
    with pytest.raises(ValueError, match="carry_head.*exact_keys > 0"):
        CPUStore(1, 16, 4, 8, 2, carry_head=True)
    with pytest.raises(TypeError, match="carry_head"):
        MagicPIGConfig(exact_keys=4, carry_head=1)
    with pytest.raises(TypeError, match="carry_head"):
        CPUStore(1, 16, 4, 8, 2, exact_keys=4, carry_head="yes")
    assert MagicPIGConfig(exact_keys=4, carry_head=True).carry_head is True


def test_method_spec_names_the_carried_head():
    assert parse_method("magicpig:exact_keys=16,carry_head=1").config.carry_head is True
    assert parse_method("magicpig:exact_keys=16,carry_head=false").config.carry_head is False
    with pytest.raises(ValueError, match="carry_head='yes': expected 1, 0, true or false"):
        parse_method("magicpig:exact_keys=16,carry_head=yes")
    with pytest.raises(ValueError, match="exact_keys > 0"):
        parse_method("magicpig:carry_head=1")


def test_the_config_reaches_the_layer_and_its_decode_path():
    """SampledMiddle built from the config carries the head through the runner's trusted
    attend: the first step equals the plain hybrid's, a second step with a new query reads the
    carried keys on top of the same candidates."""
    from magicpig.attention.sampled import SampledMiddle

    gen = torch.Generator().manual_seed(6)
    hkv, hq, d, n = 2, 4, 16, 600
    k, v = make_tokens(gen, hkv, n, d)
    layers = {carry: SampledMiddle(MagicPIGConfig(K=4, L=16, kv_dtype="fp32", exact_keys=8, carry_head=carry),
                                   layer=3, num_kv_heads=hkv, head_dim=d) for carry in (False, True)}
    ids = {}
    for carry, layer in layers.items():
        ids[carry] = [layer.add_sequence()]
        layer.append(ids[carry][0], k, v)
    steps = drifting_queries(gen, k, hq // hkv, 3)
    first = {c: layer.attend_trusted(ids[c], steps[0][:, :hq]).wait() for c, layer in layers.items()}
    for a, b in zip(first[False], first[True]):
        assert torch.equal(a, b)
    second = {c: layer.attend_trusted(ids[c], steps[2][:, :hq]).wait() for c, layer in layers.items()}
    extra = second[True][2] - second[False][2]
    assert bool((extra >= 0).all()) and bool((extra <= 8).all()) and int(extra.sum()) > 0
