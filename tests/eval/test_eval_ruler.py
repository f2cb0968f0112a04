"""RULER generators: needles where they say, answers in the prompt, lengths within 2% below target."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from magicpig.eval import ruler


@pytest.fixture(scope="module")
def tok():
    from magicpig.model.loading import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())


def _user_text(prompt: str) -> str:
    """The user turn of a SmolLM2 chat prompt."""
    return prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def _check_length(tok, s: ruler.RulerSample, target: int) -> None:
    """Prompt + tokens to generate fit the target; the prompt is within 2% below it, or (whole
    needles / documents) short of it by less than the next unit."""
    n = len(tok(s.prompt, add_special_tokens=False)["input_ids"])
    assert n == s.num_tokens and s.target_tokens == target - s.tokens_to_generate
    assert n + s.tokens_to_generate <= target, (s.task, n, target)
    if "next_unit_tokens" in s.meta:
        assert ruler._whole_units(s.task) and n + s.meta["next_unit_tokens"] > s.target_tokens
    else:
        assert (1 - ruler.LENGTH_TOLERANCE) * s.target_tokens <= n, (s.task, n, target)


LENGTH_CASES = [(t, 1024) for t in ruler.TASKS if t != "qa_2"] + [("qa_2", 2048)]


@pytest.mark.parametrize("task,length", LENGTH_CASES)
def test_prompt_length_within_two_percent_below_target(tok, task, length):
    for index in (0, 1):
        s = ruler.generate_sample(task, length, index, tok, seed=3)
        _check_length(tok, s, length)
        # The answer prefix follows the chat template's assistant header.
        reply = s.prompt.rsplit("<|im_start|>assistant\n", 1)[1]
        assert reply.startswith(("The special magic", "Answer:")), reply[:40]
        assert s.answers


def test_lengths_at_4k_and_model_limit(tok):
    s = ruler.generate_sample("niah_multikey_1", 4096, 0, tok)
    _check_length(tok, s, 4096)
    # Near the model's limit the target leaves room for the tokens to generate (RULER's rule).
    s = ruler.generate_sample("niah_single_2", 2048, 0, tok, max_total=2000)
    assert s.target_tokens == 2000 - 128
    _check_length(tok, s, 2000)
    s = ruler.generate_sample("niah_single_2", 2048, 0, tok, max_total=4096)
    _check_length(tok, s, 2048)


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_token_budget_at_4k(tok, task):
    """RULER's budget: prompt (chat template included) + tokens to generate <= 4096."""
    s = ruler.generate_sample(task, 4096, 0, tok)
    _check_length(tok, s, 4096)
    assert s.tokens_to_generate == {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                                    "freq_words_extraction": 50, "qa": 32}[ruler.TASKS[task][0]]


def test_short_target_raises(tok):
    with pytest.raises(ValueError, match="qa_2|shorter"):
        ruler.generate_sample("qa_2", 1024, 0, tok)
    with pytest.raises(ValueError, match="task="):
        ruler.generate_sample("niah_nope", 1024, 0, tok)


def test_samples_are_deterministic_and_distinct(tok):
    a = ruler.generate_sample("niah_single_2", 1024, 0, tok, seed=1)
    b = ruler.generate_sample("niah_single_2", 1024, 0, tok, seed=1)
    c = ruler.generate_sample("niah_single_2", 1024, 1, tok, seed=1)
    d = ruler.generate_sample("niah_single_2", 1024, 0, tok, seed=2)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert a.answers != c.answers and a.answers != d.answers


NIAH = [t for t, (fam, _) in ruler.TASKS.items() if fam == "niah"]


@pytest.mark.parametrize("task", NIAH)
def test_needles_at_their_depths_and_values_in_answers(tok, task):
    _, params = ruler.TASKS[task]
    for index in range(3):
        s = ruler.generate_sample(task, 2048, index, tok, seed=index)
        text = _user_text(s.prompt)
        context = text.split("\n", 1)[1].rsplit("\nWhat ", 1)[0]
        needles, depths = s.meta["needles"], s.meta["depths"]
        assert len(needles) == max(params["num_k"], params["num_q"]) * params["num_v"]
        positions = []
        for needle, depth in zip(needles, depths):
            assert context.count(needle) == 1, needle
            pos = context.index(needle) / len(context)
            positions.append(pos)
            # Inserted before unit int(units * depth/100): within a few units of that depth.
            assert abs(pos - depth / 100) < 0.08, (needle, pos, depth)
        assert positions == sorted(positions)
        # Every answer is the value of a needle whose key is asked about.
        values = {n.rsplit(" is: ", 1)[1].rstrip("."): n for n in needles}
        question = text.rsplit("\nWhat ", 1)[1]
        assert len(s.answers) == params["num_q"] * params["num_v"]
        for ans in s.answers:
            assert ans in values
            key = values[ans].split(" for ", 1)[1].rsplit(" is: ", 1)[0]
            assert key in question and key in s.prompt.rsplit("<|im_start|>assistant", 1)[1]
        if params["value"] == "numbers":
            assert all(re.fullmatch(r"\d{7}", a) for a in s.answers)
        if params["value"] == "uuids":
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)
                       for a in s.answers)
        if params["key"] == "words":
            key = values[s.answers[0]].split(" for ", 1)[1].rsplit(" is: ", 1)[0]
            adj, noun = key.split("-", 1)
            adjs, nouns = ruler.key_word_parts()
            assert adj in adjs and noun in nouns


def test_single_needle_wording(tok):
    s = ruler.generate_sample("niah_single_1", 1024, 0, tok)
    assert "A special magic number is hidden" in s.prompt
    assert s.prompt.rstrip().endswith("mentioned in the provided text is")
    m = ruler.generate_sample("niah_multivalue", 1024, 0, tok)
    assert "Some special magic numbers are hidden" in m.prompt


def test_noise_haystack_is_the_repeated_sentences(tok):
    s = ruler.generate_sample("niah_single_1", 1024, 0, tok)
    ctx = _user_text(s.prompt)
    assert ctx.count(ruler.NOISE) > 20


def test_needle_haystack_is_distractor_needles(tok):
    s = ruler.generate_sample("niah_multikey_2", 1024, 0, tok)
    n_needles = len(re.findall(r"One of the special magic numbers? for [\w-]+ is: \d{7}\.", s.prompt))
    assert n_needles > 20  # the haystack is made of (distractor) needles
    assert s.prompt.count(f"is: {s.answers[0]}.") == 1


def test_variable_tracking_chain(tok):
    s = ruler.generate_sample("vt", 2048, 0, tok)
    user = _user_text(s.prompt)
    example, main = user.split("\n\nMemorize and track", 1)
    names = s.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(rf"VAR {names[0]} = (\d+)", main).group(1)
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}" in main
    assert main.index(f"VAR {names[0]} =") < main.index(f"VAR {names[-1]} =")
    assert f"assigned the value {value} in the text above" in main
    assert f"assgined the value {value}" in s.prompt.rsplit("<|im_start|>assistant", 1)[1]
    # The one-shot example carries its own answers (3-letter names) after its answer prefix.
    ex_names = s.meta["example_answers"]
    assert example.rstrip().endswith(" ".join(ex_names)) and all(len(n) == 3 for n in ex_names)


@pytest.mark.parametrize("length,repeats", [(1024, 6), (4096, 30)])
def test_common_words_are_the_most_common(tok, length, repeats):
    s = ruler.generate_sample("cwe", length, 0, tok)
    main = _user_text(s.prompt).split("\n", 1)[1]  # after the one-shot example's first line
    main = main[main.index("Below is a numbered list"):]
    words = re.findall(r"\d+\. ([a-z-]+)", main.split("\nQuestion:")[0])
    counts = Counter(words)
    assert len(s.answers) == 10
    for w in s.answers:
        assert counts[w] == repeats
    assert max(c for w, c in counts.items() if w not in s.answers) < repeats


def test_frequent_words_are_the_most_frequent(tok):
    s = ruler.generate_sample("fwe", 2048, 0, tok)
    text = _user_text(s.prompt).split("coded words. ", 1)[1].split("\nQuestion:")[0]
    counts = Counter(text.split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert counts.most_common(1)[0][0] == "..."
    assert ranked[:3] == s.answers


@pytest.mark.parametrize("task,length", [("qa_1", 1024), ("qa_2", 4096)])
def test_qa_answer_in_gold_document(tok, task, length):
    for index in (0, 5):
        s = ruler.generate_sample(task, length, index, tok)
        user = _user_text(s.prompt)
        docs = re.split(r"\n\nDocument \d+:\n", "\n\n" + user.split("The following are given documents.", 1)[1])
        gold = [docs[i] for i in s.meta["gold_documents"]]
        if task == "qa_1":  # SQuAD answers are spans of their paragraph
            assert any(a in gold[0] for a in s.answers)
        assert len(docs) - 1 > len(gold)  # distractors were added
        assert s.metric == "string_match_part"


def test_fit_size_finds_the_largest_fitting_size():
    f = lambda s: 100 + 3 * s  # noqa: E731
    assert ruler.fit_size(f, 1000, 10) == 300
    assert ruler.fit_size(f, 1000, 5000) == 300
    with pytest.raises(ValueError):
        ruler.fit_size(f, 50, 10)


def test_resolve_tasks():
    assert ruler.resolve_tasks(["all"]) == list(ruler.TASKS)
    assert ruler.resolve_tasks(["vt", "cwe", "vt"]) == ["vt", "cwe"]
    with pytest.raises(ValueError, match="niah_x"):
        ruler.resolve_tasks(["niah_x"])


def _qa_documents(s: ruler.RulerSample) -> list[str]:
    """The documents of a QA prompt, in order (Document 1 first)."""
    user = _user_text(s.prompt).split("The following are given documents.\n\n", 1)[1]
    context = user.rsplit("\n\nAnswer the question based on", 1)[0]
    return re.split(r"\n\n(?=Document \d+:\n)", context)


def _official_gold_slot(num_docs: int, seed: int) -> int:
    """RULER qa.py: all_docs = gold + others, then random.Random(seed).shuffle(all_docs)."""
    import random

    docs = list(range(num_docs))
    random.Random(seed).shuffle(docs)
    return docs.index(0) + 1


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_gold_slot_follows_the_official_layout(tok, task):
    for index in (0, 1):
        s = ruler.generate_sample(task, 4096, index, tok)
        docs = _qa_documents(s)
        assert s.meta["gold_documents"][0] == _official_gold_slot(len(docs), 42)  # seed 0 -> RULER's 42
        s3 = ruler.generate_sample(task, 4096, index, tok, seed=3)
        assert s3.meta["gold_documents"][0] == _official_gold_slot(len(_qa_documents(s3)), 45)
    # The per-sample shuffle stays available and places the gold document elsewhere.
    slots = {ruler.generate_sample("qa_1", 4096, i, tok, qa_shuffle="per_sample").meta["gold_documents"][0]
             for i in range(4)}
    assert len(slots) > 1
    with pytest.raises(ValueError, match="qa_shuffle"):
        ruler.generate_sample("qa_1", 4096, 0, tok, qa_shuffle="nope")


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_documents_are_whole(tok, task):
    _, all_docs = ruler.qa_dataset(ruler.TASKS[task][1]["dataset"])
    known = set(all_docs)
    s = ruler.generate_sample(task, 4096, 0, tok)
    docs = _qa_documents(s)
    for i, d in enumerate(docs):
        head, body = d.split("\n", 1)
        assert head == f"Document {i + 1}:" and body in known, (i, body[-80:])


@pytest.mark.parametrize("task,length", [("niah_multikey_2", 1024), ("niah_multikey_3", 1024),
                                         ("niah_multikey_3", 4096)])
def test_needle_haystack_is_whole_needles(tok, task, length):
    s = ruler.generate_sample(task, length, 0, tok)
    context = _user_text(s.prompt).split("\n", 1)[1].rsplit("\nWhat ", 1)[0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    item = uuid if "uuids" in s.meta["needles"][0] else r"[a-z]+-[a-z]+|\d{7}"
    lines = context.split("\n")
    assert len(lines) > 5
    for line in lines:
        assert re.fullmatch(rf"One of the special magic (numbers?|uuids?) for ({item}) is: ({item})\.", line), line
    for needle in s.meta["needles"]:
        assert needle in lines


@pytest.mark.parametrize("length", [2048, 4096, 8192])
def test_fwe_vocabulary_size(length):
    """RULER: vocab_size = (max_seq_length - tokens_to_generate) // 50, tokens_to_generate = 50."""
    d = ruler.make_freq_words("0:fwe:0", 3000, length, alpha=2.0)
    assert d.meta["vocab_size"] == (length - 50) // 50
    assert len(set(d.fields["context"].split())) <= (length - 50) // 50
