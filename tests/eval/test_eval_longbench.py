"""LongBench loader on a tiny self-made fixture in tests/data/longbench."""

from __future__ import annotations

from pathlib import Path

import pytest

from magicpig.eval import longbench

DATA = Path(__file__).parents[1] / "data" / "longbench"


@pytest.fixture(scope="module")
def tok():
    from magicpig.model.loading import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())


# LongBench v1's config/dataset2maxlen.json and eval.py's dataset2metric, by our metric names.
OFFICIAL = {
    "narrativeqa": (128, "qa_f1"), "qasper": (128, "qa_f1"), "multifieldqa_en": (64, "qa_f1"),
    "multifieldqa_zh": (64, "qa_f1_zh"), "hotpotqa": (32, "qa_f1"), "2wikimqa": (32, "qa_f1"),
    "musique": (32, "qa_f1"), "dureader": (128, "rouge_zh"), "gov_report": (512, "rouge"),
    "qmsum": (512, "rouge"), "multi_news": (512, "rouge"), "vcsum": (512, "rouge_zh"),
    "trec": (64, "classification"), "triviaqa": (32, "qa_f1"), "samsum": (128, "rouge"),
    "lsht": (64, "classification"), "passage_count": (32, "count"),
    "passage_retrieval_en": (32, "retrieval"), "passage_retrieval_zh": (32, "retrieval_zh"),
    "lcc": (64, "code_sim"), "repobench-p": (64, "code_sim"),
}


def test_config_is_the_official_one():
    cfg = longbench.task_configs()
    assert {t: (c["max_gen"], c["metric"]) for t, c in cfg.items()} == OFFICIAL
    # eval.py scores only the first line on these four; pred.py skips the chat template on them
    # and on the two code tasks.
    assert {t for t, c in cfg.items() if c["first_line"]} == {"trec", "triviaqa", "samsum", "lsht"}
    assert {t for t, c in cfg.items() if not c["chat"]} == {"trec", "triviaqa", "samsum", "lsht",
                                                            "lcc", "repobench-p"}
    assert all("{context}" in c["prompt"] for c in cfg.values())


def test_prompt_budget_is_max_length_minus_generation():
    assert longbench.prompt_budget("hotpotqa", 4096) == 4096 - 32
    assert longbench.prompt_budget("gov_report", 8192) == 8192 - 512
    with pytest.raises(ValueError, match="512 generated tokens"):
        longbench.prompt_budget("gov_report", 512)


class CharTokenizer:
    """One token per character: truncation's arithmetic without a real vocabulary."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def test_truncate_middle_keeps_half_from_each_end():
    tok = CharTokenizer()
    assert longbench.truncate_middle(tok, "abcdefghij", 10) == "abcdefghij"
    assert longbench.truncate_middle(tok, "abcdefghij", 6) == "abchij"
    # pred.py: half = int(max_length / 2) from each end, so an odd budget keeps one token less.
    assert longbench.truncate_middle(tok, "abcdefghij", 5) == "abij"


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


def test_prompt_never_passes_the_budget(tok):
    # The chat template counts inside the budget, and re-encoding at the cut cannot push the
    # prompt over it: prompt + the task's answer fit max_length.
    for max_length in (300, 301, 457, 1000):
        s = longbench.load_samples(DATA, "hotpotqa", tok, max_length)[1]
        assert s.num_tokens == len(tok(s.prompt, add_special_tokens=False)["input_ids"])
        assert max_length - 32 - 3 <= s.num_tokens <= max_length - 32


def test_bad_records_raise(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(ValueError, match="answers"):
        list(longbench.read_records(tmp_path, "hotpotqa"))
