"""MiddleAttention.fork and read for every method: a fork answers as a fresh sequence holding
the same middle tokens, stays so while its source grows and after the source is removed, and
read gives back the tokens held (streaming keeps none: read raises NotImplementedError)."""

from __future__ import annotations

import pytest
import torch

from magicpig.attention.baselines import RETRIEVAL_EXACT_BELOW
from magicpig.attention.registry import make_method
from magicpig.config import MagicPIGConfig
from magicpig.store import extension_available

HKV, HQ, D = 2, 4, 16
METHODS = ["dense", "topk", "quest", "oracle_sampling", "retrieval", "streaming", "magicpig-numba",
           pytest.param("magicpig-cpp", marks=pytest.mark.skipif(not extension_available(),
                                                                 reason="extension not built"))]


def _method(name: str):
    name, _, backend = name.partition("-")
    cfg = MagicPIGConfig(method=name, budget=0.1, seed=1, K=4, L=24, kv_dtype="fp32", cpu_backend=backend or "auto")
    return make_method(cfg, layer=2, num_kv_heads=HKV, head_dim=D)


def _tokens(g, n):
    return torch.randn(HKV, n, D, generator=g), torch.randn(HKV, n, D, generator=g)


def _same(got, want, name):
    """Equal answers (out and lse to float summation; oracle_sampling draws at random: its lse only)."""
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    if name != "oracle_sampling":
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("name", METHODS)
def test_fork_answers_as_a_fresh_sequence(name):
    g = torch.Generator().manual_seed(0)
    m = _method(name)
    k, v = _tokens(g, 700)
    src = m.add_sequence()
    m.append(src, k[:, :500], v[:, :500])
    m.append(src, k[:, 500:], v[:, 500:])
    q = torch.randn(1, HQ, D, generator=g) * 2
    m.attend([src], q)  # per-sequence caches (quest's pages) exist for the source
    fork = m.fork(src, 450)
    assert m.length(fork) == 450 and m.length(src) == 700
    own_k, own_v = _tokens(g, 60)
    m.append(fork, own_k, own_v)
    fresh = m.add_sequence()
    m.append(fresh, torch.cat([k[:, :450], own_k], 1), torch.cat([v[:, :450], own_v], 1))
    want = m.attend([fresh], q)
    _same(m.attend([fork], q), want, name)
    m.append(src, *_tokens(g, 40))  # the source grows, then goes
    _same(m.attend([fork], q), want, name)
    m.remove_sequence(src)
    _same(m.attend([fork], q), want, name)
    assert m.length(fork) == 510
    if name == "streaming":
        with pytest.raises(NotImplementedError, match="StreamingMiddle.read"):
            m.read(fork, 0, 1)
        return
    keys, values = m.read(fork, 440, 470)
    assert keys.shape == (HKV, 30, D)
    assert torch.equal(keys.float(), torch.cat([k[:, 440:450], own_k[:, :20]], 1))
    assert torch.equal(values.float(), torch.cat([v[:, 440:450], own_v[:, :20]], 1))


@pytest.mark.parametrize("name", METHODS)
def test_fork_and_read_arguments_are_checked(name):
    m = _method(name)
    sid = m.add_sequence()
    m.append(sid, torch.randn(HKV, 5, D), torch.randn(HKV, 5, D))
    for tokens in (-1, 6):
        with pytest.raises(ValueError, match="tokens"):
            m.fork(sid, tokens)
    with pytest.raises(TypeError, match="tokens"):
        m.fork(sid, 1.5)
    assert m.length(m.fork(sid, 0)) == 0 and m.length(m.fork(sid, 5)) == 5
    if name != "streaming":
        with pytest.raises(ValueError, match="end"):
            m.read(sid, 2, 6)


def test_retrieval_fork_builds_its_own_index():
    g = torch.Generator().manual_seed(1)
    m = _method("retrieval")
    src = m.add_sequence()
    m.append(src, *_tokens(g, RETRIEVAL_EXACT_BELOW + 50))
    q = torch.randn(1, HQ, D, generator=g)
    m.attend([src], q)  # the source's HNSW index holds all of its keys
    fork = m.fork(src, RETRIEVAL_EXACT_BELOW + 20)
    out, lse, read = m.attend([fork], q)
    assert m._index_for(fork)[0].ntotal == RETRIEVAL_EXACT_BELOW + 20
    assert torch.isfinite(lse).all() and (read > 0).all()
