"""The exact-head benchmark (magicpig.perf.bench_exact_keys: scripts/bench_exact_keys.py,
`magicpig bench exact-keys`) on a small case: its figures are side by side and the exact head
reads no key the sample does not."""

from __future__ import annotations

import json

from magicpig.perf import bench_exact_keys


def test_figures_side_by_side_and_the_head_reads_no_extra_key(tmp_path, capsys):
    out = tmp_path / "fig.json"
    bench_exact_keys.main(["--lengths", "3000", "--batches", "1", "2", "--exact", "0", "16",
                           "--repeats", "2", "--threads", "1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert [(c["context"], c["batch"]) for c in figures["cases"]] == [(3000, 1), (3000, 2)]
    for case in figures["cases"]:
        plain, hybrid = case["settings"]
        assert (plain["exact_keys"], hybrid["exact_keys"]) == (0, 16)
        assert plain["ratio_to_first"] == 1.0 and hybrid["ratio_to_first"] > 0
        assert 0 < plain["keys_read"] < 0.5 and hybrid["keys_read"] == plain["keys_read"]
    assert "ratio" in capsys.readouterr().out


def test_carried_head_reads_at_most_its_size_more(tmp_path):
    out = tmp_path / "fig.json"
    bench_exact_keys.main(["--lengths", "3000", "--batches", "2", "--exact", "0", "16", "--carry",
                           "--repeats", "4", "--threads", "1", "--json", str(out)])
    (case,) = json.loads(out.read_text())["cases"]
    plain, hybrid, carried = case["settings"]
    assert [(s["exact_keys"], s["carry_head"]) for s in case["settings"]] == [(0, False), (16, False), (16, True)]
    assert case["alternating_queries"] and hybrid["keys_read"] == plain["keys_read"]
    # the queries alternate, so last step's head is mostly not among this step's candidates
    assert hybrid["keys_read"] < carried["keys_read"] <= hybrid["keys_read"] + 16 / 3000 + 1e-9
