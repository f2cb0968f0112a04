"""LongBench loader on a tiny self-made fixture in tests/data/longbench."""

from __future__ import annotations

from pathlib import Path

import pytest

from magicpig.eval import longbench

DATA = Path(__file__).parent / "data" / "longbench"


@pytest.fixture(scope="module")
def tok():
    from magicpig.model.loading import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())


def test_config_covers_the_official_tasks():
    cfg = longbench.task_configs()
    assert len(cfg) == 21
    assert cfg["hotpotqa"]["max_gen"] == 32 and cfg["hotpotqa"]["metric"] == "qa_f1"
    assert cfg["gov_report"]["max_gen"] == 512 and cfg["gov_report"]["metric"] == "rouge"
    assert not cfg["trec"]["chat"] and cfg["trec"]["first_line"]
    assert all("{context}" in c["prompt"] for c in cfg.values())


def test_resolve_tasks():
    assert longbench.resolve_tasks(DATA, ["all"]) == ["hotpotqa", "trec", "passage_count", "lcc"]
    with pytest.raises(ValueError, match="narrativeqa"):
        longbench.resolve_tasks(DATA, ["narrativeqa"])
    with pytest.raises(ValueError, match="directory"):
        longbench.resolve_tasks(DATA / "nope", ["all"])


def test_prompt_template_and_chat(tok):
    s = longbench.load_samples(DATA, "hotpotqa", tok, 4096)[0]
    assert "Paris is the capital of France." in s.prompt
    assert "Question: Which city is the capital of France?\nAnswer:" in s.prompt
    assert s.prompt.startswith("<|im_start|>") and s.tokens_to_generate == 32
    t = longbench.load_samples(DATA, "trec", tok, 4096)[0]
    assert not t.prompt.startswith("<|im_start|>") and t.all_classes[2] == "Mountain"
    c = longbench.load_samples(DATA, "passage_count", tok, 4096)[0]
    assert c.answers == ["2"]


def test_middle_truncation_keeps_both_ends(tok):
    s = longbench.load_samples(DATA, "hotpotqa", tok, 512)[1]
    assert s.num_tokens <= 512 - 32
    assert s.num_tokens > 0.9 * (512 - 32)
    assert "Passage 0:" in s.prompt and "Passage 399:" in s.prompt  # both ends kept
    assert "Passage 200:" not in s.prompt  # the middle is gone
    assert "Question: Where does river 399 flow?" in s.prompt


def test_bad_records_raise(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(ValueError, match="answers"):
        list(longbench.read_records(tmp_path, "hotpotqa"))
