"""The eval runner and CLI: method parsing, one prefill per sample, resume, summaries."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

from magicpig.config import MagicPIGConfig
from magicpig.cli import eval as cli
from magicpig.eval.runner import (
    EvalItem,
    Generated,
    parse_method,
    read_records,
    run,
    summarize,
    write_summary,
)


def test_parse_method():
    m = parse_method("magicpig:K=8,L=75")
    assert m.label == "magicpig:K=8,L=75" and (m.config.method, m.config.K, m.config.L) == ("magicpig", 8, 75)
    assert parse_method("topk:0.03").config.budget == 0.03
    q = parse_method("quest:budget=0.05,sink_tokens=8,dense_layers=0+3")
    assert (q.config.budget, q.config.sink_tokens, q.config.dense_layers) == (0.05, 8, (0, 3))
    assert parse_method("dense").config == MagicPIGConfig(method="dense")
    for bad, msg in [("nope", "expected a name"), ("dense:0.1", "budget"), ("topk:foo=1", "unknown field"),
                     ("magicpig:K=x", "not a number"), ("topk:2.0", "budget")]:
        with pytest.raises(ValueError, match=msg):
            parse_method(bad)


class _Tok:
    """Whitespace tokenizer: one id per word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


@dataclass
class _State:
    prompts: list


class FakeAdapter:
    """Answers correctly with method 'dense', wrongly otherwise; counts prefills and decodes."""

    name = "fake"
    max_context = 10_000

    def __init__(self, answers_by_prompt):
        self.tokenizer = _Tok()
        self.answers = answers_by_prompt
        self.prefills = 0
        self.decoded: list[tuple[str, int]] = []
        self.by_ids = {}

    def prefill(self, token_ids):
        self.prefills += len(token_ids)
        return _State([tuple(t) for t in token_ids])

    def select(self, state, indices):
        return _State([state.prompts[i] for i in indices])

    def concat(self, states):
        return _State([p for s in states for p in s.prompts])

    def generate(self, state, config, max_new_tokens):
        out = []
        for ids in state.prompts:
            self.decoded.append((config.method, max_new_tokens))
            right = config.method == "dense"
            out.append(Generated(self.by_ids[ids] if right else "no idea",
                                 1.0 if right else config.budget, 3, 0.01))
        return out


def _groups(adapter, tasks=("a", "b"), samples=3, length=100):
    groups = []
    for task in tasks:
        def make(task=task):
            items = []
            for i in range(samples):
                prompt = f"question {task} {i} " + "x " * (i + 1)
                ans = f"ans-{task}-{i}"
                adapter.by_ids[tuple(adapter.tokenizer(prompt)["input_ids"])] = ans
                items.append(EvalItem("ruler", task, length, i, prompt, [ans], 7,
                                      lambda p, ans=ans: float(ans in p)))
            return items
        groups.append((("ruler", task, length), make, samples))
    return groups


def test_run_prefills_once_per_sample_and_resumes(tmp_path):
    fake = FakeAdapter({})
    methods = [parse_method("dense"), parse_method("topk:0.05")]
    recs = run(fake, _groups(fake), methods, tmp_path, batch_size=2, progress=False)
    assert len(recs) == 12 and fake.prefills == 6  # 2 tasks x 3 samples, each prefilled once
    assert sorted(m for m, _ in fake.decoded) == ["dense"] * 6 + ["topk"] * 6
    assert all(n == 7 for _, n in fake.decoded)
    scores = {(r["task"], r["index"], r["method"]): r["score"] for r in recs}
    assert all(v == 1.0 for (t, i, m), v in scores.items() if m == "dense")
    assert all(v == 0.0 for (t, i, m), v in scores.items() if m != "dense")
    # A rerun does nothing; a new method only decodes that method (one prefill per sample again).
    fake2 = FakeAdapter({})
    run(fake2, _groups(fake2), methods, tmp_path, progress=False)
    assert fake2.prefills == 0 and fake2.decoded == []
    fake3 = FakeAdapter({})
    recs = run(fake3, _groups(fake3), methods + [parse_method("streaming")], tmp_path, progress=False)
    assert fake3.prefills == 6 and {m for m, _ in fake3.decoded} == {"streaming"}
    assert len(recs) == 18 and len(read_records(tmp_path)) == 18


def test_partial_file_resumes_only_missing(tmp_path):
    fake = FakeAdapter({})
    methods = [parse_method("dense")]
    run(fake, _groups(fake), methods, tmp_path, progress=False)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    # Simulate a kill: drop two records and tear the last line.
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    fake2 = FakeAdapter({})
    recs = run(fake2, _groups(fake2), methods, tmp_path, progress=False)
    assert len(fake2.decoded) == 2 and len(recs) == 6


def test_group_that_cannot_be_built_is_skipped(tmp_path, capsys):
    fake = FakeAdapter({})

    def broken():
        raise ValueError("qa_2 at length 1024: too short")

    groups = [(("ruler", "qa_2", 1024), broken, 2)] + _groups(fake, tasks=("a",), samples=1)
    recs = run(fake, groups, [parse_method("dense")], tmp_path, progress=False)
    assert [r["task"] for r in recs] == ["a"]
    assert "skipping qa_2@1024" in capsys.readouterr().out


def test_other_model_in_out_dir_is_refused(tmp_path):
    fake = FakeAdapter({})
    run(fake, _groups(fake, samples=1), [parse_method("dense")], tmp_path, progress=False)
    other = FakeAdapter({})
    other.name = "other"
    with pytest.raises(ValueError, match="another --out"):
        run(other, _groups(other, samples=1), [parse_method("dense")], tmp_path, progress=False)


def test_summary_tables(tmp_path):
    recs = []
    for task, s_dense, s_topk in (("a", 1.0, 0.5), ("b", 0.5, 0.0)):
        for i in range(2):
            recs.append(dict(benchmark="ruler", task=task, length=1024, index=i, method="dense", score=s_dense, cost=1.0))
            recs.append(dict(benchmark="ruler", task=task, length=1024, index=i, method="topk:0.03", score=s_topk, cost=0.03))
    rows = {(r["task"], r["method"]): r for r in summarize(recs)}
    assert rows[("a", "dense")]["score"] == 100.0 and rows[("b", "topk:0.03")]["score"] == 0.0
    assert rows[("average", "dense")]["score"] == 75.0 and rows[("average", "topk:0.03")]["score"] == 25.0
    assert rows[("average", "topk:0.03")]["cost"] == pytest.approx(3.0)
    paths = write_summary(tmp_path, recs, ["dense", "topk:0.03"])
    md = paths["md"].read_text()
    assert "| **average** | 75.0 | 25.0 |" in md and "| cost (% keys read) | 100.00 | 3.00 |" in md
    # below the scores, top-k answer by answer against dense: lower on all 4 prompts
    assert "answer by answer against dense" in md and "| topk:0.03 | 4 | 0 | 0 | 4 | 0.12 |" in md
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert {"benchmark", "task", "length", "method", "n", "score", "cost"} <= set(table[0])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_merges_pieces_of_a_run(tmp_path, capsys):
    """Two processes ran different tasks into their own --out; `summary --merge` makes one table,
    skips records already present (a second merge adds nothing) and refuses mixed models."""
    fake = FakeAdapter({})
    a, b = tmp_path / "a", tmp_path / "b"
    run(fake, _groups(fake, samples=2), [parse_method("dense")], a, progress=False)
    run(fake, _groups(fake, samples=2), [parse_method("dense"), parse_method("topk:0.03")], b, progress=False)
    both = tmp_path / "all"
    argv = ["summary", "--out", str(both), "--merge", str(a), str(b), "--methods", "topk:0.03", "dense"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    n_b = len(read_records(b))
    assert f"merged {n_b} records" in out  # a's records are all in b too: no duplicates
    assert "| task | topk:0.03 | dense |" in out
    assert len(read_records(both)) == n_b
    assert cli.main(argv) == 0 and "merged 0 records" in capsys.readouterr().out
    other = FakeAdapter({})
    other.name = "other"
    c = tmp_path / "c"
    run(other, _groups(other, samples=1), [parse_method("dense")], c, progress=False)
    assert cli.main(["summary", "--out", str(both), "--merge", str(c)]) == 2
    assert "several models" in capsys.readouterr().err
    assert len(read_records(both)) == n_b  # nothing written on refusal
    assert cli.main(["summary", "--out", str(both), "--merge", str(tmp_path / "none")]) == 2


def test_shards_split_the_samples_of_every_task(tmp_path):
    """Shards 0/3, 1/3, 2/3 answer disjoint samples of every task; merged, they are the
    unsharded run; a bad shard is refused."""
    methods = [parse_method("dense"), parse_method("topk:0.05")]
    fake = FakeAdapter({})
    whole = run(fake, _groups(fake, samples=5), methods, tmp_path / "whole", progress=False)
    pieces = []
    for i in range(3):
        fake = FakeAdapter({})
        recs = run(fake, _groups(fake, samples=5), methods, tmp_path / f"p{i}", progress=False, shard=(i, 3))
        assert {r["index"] % 3 for r in recs} == {i} and {r["task"] for r in recs} == {"a", "b"}
        assert fake.prefills == 2 * len(range(i, 5, 3))  # only its own samples are prefilled
        pieces.append(recs)
    keys = [(r["task"], r["index"], r["method"]) for recs in pieces for r in recs]
    assert len(keys) == len(set(keys)) == len(whole)
    assert {(r["task"], r["index"], r["method"], r["prediction"]) for recs in pieces for r in recs} == \
        {(r["task"], r["index"], r["method"], r["prediction"]) for r in whole}
    with pytest.raises(ValueError, match="shard"):
        run(FakeAdapter({}), [], methods, tmp_path / "bad", progress=False, shard=(3, 3))


def test_worker_command_line():
    from magicpig.eval.workers import parse_shard, without_workers, worker_command

    argv = ["ruler", "--workers", "2", "--samples", "3", "--workers=4", "--out", "r"]
    assert without_workers(argv) == ["ruler", "--samples", "3", "--out", "r"]
    cmd = worker_command(argv, 1, 2, Path("r/workers/1of2"), 3)
    assert cmd[1:4] == ["-m", "magicpig", "eval"] and "--workers" not in " ".join(cmd)
    assert cmd[-7:] == ["--shard", "1/2", "--out", "r/workers/1of2", "--threads", "3", "--no-progress"]
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_cli_rejects_bad_worker_arguments(capsys):
    fake = FakeAdapter({})
    assert cli.main(["ruler", "--workers", "0", "--out", "/tmp/x"], adapter=fake) == 2
    assert "--workers" in capsys.readouterr().err
    assert cli.main(["ruler", "--shard", "2/2", "--out", "/tmp/x"], adapter=fake) == 2
    assert "--shard" in capsys.readouterr().err
    assert cli.main(["ruler", "--shard", "0/2", "--workers", "2", "--out", "/tmp/x"], adapter=fake) == 2
    assert "one or the other" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys):
    fake = FakeAdapter({})
    assert cli.main(["ruler", "--tasks", "nope", "--out", "/tmp/x"], adapter=fake) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["ruler", "--methods", "topk:7", "--out", "/tmp/x"], adapter=fake) == 2
    assert cli.main(["ruler", "--lengths", "20000", "--out", "/tmp/x"], adapter=fake) == 2


# ---------------------------------------------------------------------------- real model


def _sampled_available() -> bool:
    try:
        import magicpig.attention.sampled  # noqa: F401
    except Exception:
        return False
    return True


def test_cli_end_to_end_real_model_and_resume(tmp_path, capsys):
    """2 tasks x 2 samples x 1k tokens through `magicpig eval ruler`, then resumed once."""
    methods = ["dense", "quest:0.05", "streaming"] + (["magicpig:K=8,L=75"] if _sampled_available() else [])
    argv = ["ruler", "--lengths", "1024", "--tasks", "niah_single_1", "niah_multikey_2", "--samples", "2",
            "--methods", *methods, "--out", str(tmp_path), "--no-progress", "--batch-size", "2", "--max-new-tokens", "12"]
    from magicpig.eval.runner import load_model

    adapter = load_model("smollm2-135m-instruct")
    adapter.max_context = min(adapter.max_context, 8192)
    assert cli.main(argv, adapter=adapter) == 0
    recs = read_records(tmp_path)
    assert len(recs) == 2 * 2 * len(methods)
    by = {(r["task"], r["index"], r["method"]): r for r in recs}
    for r in recs:  # prompt + niah's 128 tokens to generate within 1024 (whole distractor needles: within one)
        assert 0.9 * (1024 - 128) <= r["prompt_tokens"] <= 1024 - 128
    # The model finds a single needle in a noise haystack with dense attention...
    assert by[("niah_single_1", 0, "dense")]["score"] == 1.0
    # ...dense reads everything, streaming nothing, quest about its budget.
    assert all(by[k]["cost"] == 1.0 for k in by if k[2] == "dense")
    assert all(by[k]["cost"] == 0.0 for k in by if k[2] == "streaming")
    assert all(0.03 < by[k]["cost"] < 0.08 for k in by if k[2] == "quest:0.05")
    md = (tmp_path / "summary.md").read_text()
    assert "### ruler @ 1024 tokens" in md and (tmp_path / "accuracy_vs_cost.png").is_file()
    # Resume: a rerun answers nothing new and leaves the file as it was.
    before = (tmp_path / "predictions.jsonl").read_text()
    calls = []
    real_generate = adapter.generate
    adapter.generate = lambda *a, **k: calls.append(1) or real_generate(*a, **k)
    assert cli.main(argv, adapter=adapter) == 0
    assert calls == [] and (tmp_path / "predictions.jsonl").read_text() == before
    capsys.readouterr()


def test_cli_longbench_on_fixture(tmp_path, capsys):
    """`magicpig eval longbench` on the tiny fixture with the real model and dense attention."""
    from magicpig.eval.runner import load_model

    data = Path(__file__).parents[1] / "data" / "longbench"
    adapter = load_model("smollm2-135m-instruct")
    argv = ["longbench", "--data", str(data), "--tasks", "hotpotqa", "passage_count", "--samples", "1",
            "--methods", "dense", "--out", str(tmp_path), "--no-progress", "--max-new-tokens", "8"]
    assert cli.main(argv, adapter=adapter) == 0
    recs = {r["task"]: r for r in read_records(tmp_path)}
    assert set(recs) == {"hotpotqa", "passage_count"}
    assert recs["hotpotqa"]["length"] == adapter.max_context and recs["hotpotqa"]["answers"] == ["Paris"]
    assert 0.0 <= recs["passage_count"]["score"] <= 1.0
    assert "### longbench @" in (tmp_path / "summary.md").read_text()
    capsys.readouterr()


def test_workers_split_a_real_run_and_merge_it(tmp_path, capsys):
    """`--workers 2` on the real model: two processes, each its share of every task, merged
    into --out with the answers of a one-process run; a rerun resumes and adds nothing."""
    base = ["ruler", "--lengths", "512", "--tasks", "niah_single_1", "niah_multikey_1", "--samples", "3",
            "--methods", "dense", "--no-progress", "--batch-size", "1", "--max-new-tokens", "8", "--threads", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(base + ["--out", str(one)]) == 0
    assert cli.main(base + ["--out", str(two), "--workers", "2"]) == 0
    assert "2 workers of 1 thread(s) each" in capsys.readouterr().out

    def answers(path):
        return {(r["task"], r["index"], r["method"]): r["prediction"] for r in read_records(path)}

    assert len(answers(one)) == 6 and answers(two) == answers(one)
    for i in range(2):
        assert {k[1] % 2 for k in answers(two / "workers" / f"{i}of2")} == {i}
    assert (two / "summary.md").is_file()
    before = (two / "predictions.jsonl").read_text()
    assert cli.main(base + ["--out", str(two), "--workers", "2"]) == 0
    assert (two / "predictions.jsonl").read_text() == before
    capsys.readouterr()
