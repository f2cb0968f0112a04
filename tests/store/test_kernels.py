"""Triton kernels against the torch reference, run by Triton's interpreter on the CPU."""

import os
import subprocess
import sys
import textwrap

import pytest

_CHECK = textwrap.dedent(
    """
    import torch
    from magicpig.kernels.simhash import simhash_codes
    from magicpig.lsh import SimHash, hash_codes

    torch.manual_seed(0)
    for d, K, L, n, dtype in [(64, 10, 20, 37, torch.float32), (128, 4, 3, 5, torch.bfloat16),
                              (24, 1, 1, 1, torch.float16), (64, 16, 40, 64, torch.float32)]:
        h = SimHash(d, K, L, seed=d + K)
        x = torch.randn(n, d).to(dtype)
        got, want = simhash_codes(x, h.projection, K), hash_codes(x, h.projection, K)
        assert got.dtype == torch.int32 and got.shape == (n, L)
        # A dot product within rounding of 0 may flip a bit; count them, demand near-equality.
        assert (got != want).float().mean().item() < 1e-3, (d, K, L, (got != want).sum())
        assert int(got.max()) < 2**K and int(got.min()) >= 0
    # Adversarial: zero vectors (every bit 0, since x.P > 0 is false) and batched leading dims.
    h = SimHash(32, 8, 5, seed=1)
    assert torch.all(simhash_codes(torch.zeros(3, 32), h.projection, 8) == 0)
    x = torch.randn(2, 3, 4, 32)
    assert torch.equal(simhash_codes(x, h.projection, 8), hash_codes(x, h.projection, 8))
    assert simhash_codes(torch.randn(0, 32), h.projection, 8).shape == (0, 5)
    for bad, match in [((torch.randn(3, 31), h.projection, 8), "last dim 32"),
                       ((torch.randn(3, 32), h.projection, 7), "K=7")]:
        try:
            simhash_codes(*bad)
        except ValueError as err:
            assert match in str(err), err
        else:
            raise AssertionError("no error for " + match)
    print("OK")
    """
)


def test_simhash_kernel_matches_reference_under_the_interpreter():
    pytest.importorskip("triton", reason="triton is in the [gpu] and [test] extras")
    # TRITON_INTERPRET must be set before triton is imported, hence the subprocess.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_cpu_path_never_imports_triton():
    """triton is an extra ([gpu]): hashing, the store and a sparse decode on the CPU run without it."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        from magicpig import MagicPIGConfig
        from magicpig.attention.sampled import SampledMiddle
        from magicpig.lsh import SimHash
        h = SimHash(16, 4, 8, seed=0)
        assert h.hash(torch.randn(5, 16)).shape == (5, 8)
        m = SampledMiddle(MagicPIGConfig(K=4, L=8), layer=1, num_kv_heads=1, head_dim=16)
        sid = m.add_sequence()
        m.append(sid, torch.randn(1, 50, 16), torch.randn(1, 50, 16))
        out, lse, n = m.attend([sid], torch.randn(1, 2, 16))
        assert torch.isfinite(out).all()
        print("triton" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
