import re

import pytest

from magicpig import MagicPIGConfig


def test_defaults_follow_the_design():
    cfg = MagicPIGConfig()
    assert (cfg.K, cfg.L, cfg.min_collisions) == (None, None, None)  # chosen for the model
    assert not cfg.lsh_resolved
    given = MagicPIGConfig(K=10, L=150)
    assert given.lsh_resolved and given.min_collisions == 2  # the paper's threshold
    assert (cfg.sink_tokens, cfg.window_tokens) == (4, 64)
    assert cfg.resolve_dense_layers(30) == (0, 15)
    assert cfg.resolve_dense_layers(1) == (0,)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("K", 0, r"\[1, 20\]"),
        ("K", 21, r"\[1, 20\]"),
        ("K", 2.5, "integer"),
        ("K", True, "integer"),
        ("seed", 2**64, r"\[0, "),
        ("window_tokens", 10**7, r"\[1, 4194304\]"),
        ("sink_tokens", 2**70, r"\[0, 4194304\]"),
        ("budget", float("nan"), r"\(0.0, 1.0\]"),
        ("cpu_threads", 100_000, r"\[1, \d+\]"),
        ("L", 0, r"\[1, 1024\]"),
        ("L", 1025, r"\[1, 1024\]"),
        ("min_collisions", 0, r"\[1, 1024\]"),
        ("min_collisions", 1025, r"\[1, 1024\]"),
        ("L", 150, "both set or both None"),
        ("K", 10, "both set or both None"),
        ("sink_tokens", -1, r"\[0, "),
        ("window_tokens", 0, r"\[1, "),
        ("kv_dtype", "int8", "bf16"),
        ("method", "flash", "magicpig"),
        ("cpu_threads", 0, r"\[1, "),
        ("cpu_backend", "cuda", "numba"),
        ("budget", 0.0, r"\(0.0, 1.0\]"),
        ("budget", 1.5, r"\(0.0, 1.0\]"),
        ("dense_layers", (0, -1), "non-negative"),
        ("dense_layers", "0,1", "non-negative"),
        ("seed", -3, r"\[0, "),
    ],
)
def test_bad_values_name_the_field_value_and_range(field, value, expected):
    # A wrong type is a TypeError, a wrong value a ValueError; both name the field.
    with pytest.raises((ValueError, TypeError), match=field) as err:
        MagicPIGConfig(**{field: value})
    assert repr(value) in str(err.value)
    assert re.search(expected, str(err.value))


def test_min_collisions_range_follows_L():
    assert MagicPIGConfig(K=10, L=3, min_collisions=3).min_collisions == 3
    with pytest.raises(ValueError, match=r"min_collisions=4.*\[1, 3\]"):
        MagicPIGConfig(K=10, L=3, min_collisions=4)


def test_dense_layers_are_normalised_and_checked_against_the_model():
    cfg = MagicPIGConfig(dense_layers=[5, 0, 5])
    assert cfg.dense_layers == (0, 5)
    assert cfg.resolve_dense_layers(6) == (0, 5)
    with pytest.raises(ValueError, match=r"dense_layers.*\[5\].*\[0, 4\]"):
        cfg.resolve_dense_layers(5)


def test_replace_validates_again():
    cfg = MagicPIGConfig(K=10, L=150)
    assert cfg.replace(K=8).K == 8
    with pytest.raises(ValueError, match="K"):
        cfg.replace(K=99)


def test_numpy_integers_are_integers_and_normalised():
    np = pytest.importorskip("numpy")
    cfg = MagicPIGConfig(K=np.int64(8), L=np.int32(20), min_collisions=np.int16(2), dense_layers=[np.int64(3)])
    assert (cfg.K, cfg.L, cfg.min_collisions, cfg.dense_layers) == (8, 20, 2, (3,))
    assert all(type(v) is int for v in (cfg.K, cfg.L, cfg.min_collisions, *cfg.dense_layers))


def test_check_model_bounds_sinks_and_window_by_the_model():
    MagicPIGConfig(sink_tokens=4, window_tokens=8188).check_model(30, 8192)
    with pytest.raises(ValueError, match=r"window_tokens=8189.*8192"):
        MagicPIGConfig(sink_tokens=4, window_tokens=8189).check_model(30, 8192)
    with pytest.raises(ValueError, match="dense_layers"):
        MagicPIGConfig(dense_layers=(30,)).check_model(30, 8192)
