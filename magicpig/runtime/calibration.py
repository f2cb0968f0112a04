"""Pick the LSH parameters ``(K, L, m)``: for a target computation cost, and as a model's default.

Users think in budgets ("read 2% of the keys"), the sampler in ``(K, L)``. A key at cosine
``c`` from the query becomes a candidate with probability
``P[Binomial(L, p(c)) >= m]``, ``p(c) = (1 - arccos(c)/pi)^K`` (DESIGN.md §2), so on a
calibration sample of (query, key) cosines the expected candidate fraction of a ``(K, L)`` is
the mean of that probability: :func:`predicted_cost`. It grows with ``L`` and shrinks with
``K`` and ``m``. :func:`kl_options` finds, for each ``(K, m)`` in a range, the smallest ``L``
that reaches the target; :func:`choose_kl` returns the option whose candidate probability is
highest on the keys that matter (the most query-aligned ``top_fraction`` of the calibration
pairs), i.e. the sharpest selection curve at that cost. More tables with a higher collision
threshold sharpen the curve (as ``L`` grows with ``m / L`` fixed it tends to a step, a top-k by
angle) at the price of index memory and hashing, which ``max_tables`` bounds. On SmolLM2 this
matters: at ~3% cost, K=10, L=150, m=2 raised the NLL of dense's RULER answers 15x more
than K=10, L=400, m=4 (docs/RESULTS.md).
The cosines must be between queries and *centred* keys, as the store hashes them.

A model's default (:func:`default_lsh`, used when ``MagicPIGConfig`` leaves K and L unset) is
the first of :func:`ranked_options` at ``DEFAULT_COST`` on the cosines of the model's own decode
queries over a short built-in prompt (:func:`calibration_prompt`), cached per model in the
user cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from magicpig.cache import cache_dir
from magicpig.config import MAX_K, MAX_L, PAPER_LSH  # PAPER_LSH: where no calibration can run
from magicpig.lsh import collision_probability
from magicpig.runtime.decode import DecodeSession
from magicpig.runtime.prefill import prefill
from magicpig.store.cpu_store import index_bytes_per_token_head

HISTOGRAM_BINS = 1001  # cosines are binned on [-1, 1] in steps of 0.002


@dataclass(frozen=True)
class KLChoice:
    K: int
    L: int
    predicted_cost: float
    min_collisions: int = 2
    recall: float = float("nan")  # predicted candidate probability of the top keys (choose_kl)


def calibration_cosines(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosines of every (query, key) pair of one head: queries [Nq, d], keys [Nk, d] -> [Nq*Nk].

    Keys should be centred (minus the mean of the middle keys) as the store hashes them.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)}: expected [Nq, d] and [Nk, d]"
        )
    q = torch.nn.functional.normalize(queries.double(), dim=-1)
    k = torch.nn.functional.normalize(keys.double(), dim=-1)
    return (q @ k.T).flatten()


def _histogram(cosines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bin centres, weights summing to 1) of the cosines on [-1, 1]."""
    c = torch.as_tensor(cosines, dtype=torch.float64).flatten().clamp(-1, 1)
    if c.numel() == 0:
        raise ValueError("cosines: expected a non-empty calibration sample")
    idx = torch.round((c + 1) / 2 * (HISTOGRAM_BINS - 1)).long()
    weights = torch.bincount(idx, minlength=HISTOGRAM_BINS).double() / c.numel()
    centres = torch.linspace(-1, 1, HISTOGRAM_BINS, dtype=torch.float64)
    keep = weights > 0
    return centres[keep], weights[keep]


def predicted_cost(cosines: torch.Tensor, K: int, L: int, min_collisions: int = 2) -> float:
    """Expected fraction of keys that become candidates, over the calibration cosines."""
    centres, weights = _histogram(cosines)
    return float((collision_probability(centres, K, L, min_collisions) * weights).sum())


def _smallest_l(centres: torch.Tensor, weights: torch.Tensor, K: int, target: float,
                min_collisions: int, max_tables: int) -> int | None:
    def cost(L: int) -> float:
        return float((collision_probability(centres, K, L, min_collisions) * weights).sum())

    # Exponential then binary search: evaluating a large L costs O(L) per bin, so never probe
    # far above the answer.
    if cost(min_collisions) >= target:
        return min_collisions
    lo, hi = min_collisions, min_collisions
    while True:
        hi = min(2 * hi, max_tables)
        if cost(hi) >= target:
            break
        if hi == max_tables:
            return None
        lo = hi
    while hi - lo > 1:  # cost(lo) < target <= cost(hi)
        mid = (lo + hi) // 2
        if cost(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _as_range(value: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    return int(lo), int(hi)


def kl_options(cosines: torch.Tensor, target_cost: float, K_range: tuple[int, int] = (4, 16),
               min_collisions: int | tuple[int, int] = 2, max_tables: int = MAX_L) -> list[KLChoice]:
    """For each K in K_range and each collision threshold in ``min_collisions`` (an int or an
    inclusive (lo, hi) range), the smallest L with predicted cost >= target_cost (options
    needing more than ``max_tables`` tables are left out)."""
    if not 0 < target_cost < 1:
        raise ValueError(f"target_cost={target_cost!r}: expected a fraction in (0, 1)")
    k_lo, k_hi = K_range
    if not 1 <= k_lo <= k_hi <= MAX_K:
        raise ValueError(f"K_range={K_range!r}: expected 1 <= K_min <= K_max <= {MAX_K}")
    m_lo, m_hi = _as_range(min_collisions)
    if not 1 <= m_lo <= m_hi:
        raise ValueError(f"min_collisions={min_collisions!r}: expected an integer >= 1 or a range lo <= hi")
    if not m_lo <= max_tables <= MAX_L:
        raise ValueError(f"max_tables={max_tables!r}: expected an integer in [{m_lo}, {MAX_L}]")
    centres, weights = _histogram(cosines)
    out = []
    for K in range(k_lo, k_hi + 1):
        for m in range(m_lo, min(m_hi, max_tables) + 1):
            L = _smallest_l(centres, weights, K, target_cost, m, max_tables)
            if L is not None:
                cost = float((collision_probability(centres, K, L, m) * weights).sum())
                out.append(KLChoice(K, L, cost, m))
    return out


def top_recall(cosines: torch.Tensor, K: int, L: int, min_collisions: int, top_fraction: float) -> float:
    """Mean candidate probability of the ``top_fraction`` most query-aligned calibration pairs."""
    c = torch.as_tensor(cosines, dtype=torch.float64).flatten().clamp(-1, 1)
    top = c.topk(max(1, int(round(top_fraction * c.numel())))).values
    return float(collision_probability(top, K, L, min_collisions).mean())


def ranked_options(cosines: torch.Tensor, target_cost: float, K_range: tuple[int, int] = (4, 16),
                   min_collisions: int | tuple[int, int] = 2, max_tables: int = 300,
                   top_fraction: float | None = None) -> list[KLChoice]:
    """The options of :func:`kl_options`, each with its :func:`top_recall` over the
    ``top_fraction`` (default ``target_cost / 4``) highest cosines, best first (fewer tables
    breaking ties). Raises ValueError when no option fits ``max_tables``."""
    top = target_cost / 4 if top_fraction is None else top_fraction
    if not 0 < top <= 1:
        raise ValueError(f"top_fraction={top_fraction!r}: expected a fraction in (0, 1]")
    options = kl_options(cosines, target_cost, K_range, min_collisions, max_tables)
    if not options:
        raise ValueError(
            f"no K in {K_range} reaches cost {target_cost} with at most {max_tables} tables; "
            "raise max_tables or lower K_range"
        )
    scored = [replace(o, recall=top_recall(cosines, o.K, o.L, o.min_collisions, top)) for o in options]
    return sorted(scored, key=lambda o: (-round(o.recall, 6), o.L))


def choose_kl(cosines: torch.Tensor, target_cost: float, K_range: tuple[int, int] = (4, 16),
              min_collisions: int | tuple[int, int] = 2, max_tables: int = 300,
              top_fraction: float | None = None) -> KLChoice:
    """The option that reads the keys that matter most reliably: the first of
    :func:`ranked_options`. Raises ValueError when no option fits ``max_tables``."""
    return ranked_options(cosines, target_cost, K_range, min_collisions, max_tables, top_fraction)[0]


# ----------------------------------------------------------------------------- calibration on a model


def model_cosines(loaded: Any, token_ids: list[int], config: Any, steps: int = 8, max_pairs: int = 2_000_000,
                  seed: int = 0) -> torch.Tensor:
    """Cosines between real decode queries and the centred middle keys of a model.

    Prefills ``token_ids`` with ``loaded`` (a :class:`magicpig.model.loaded.LoadedModel`),
    decodes ``steps`` greedy tokens with exact attention while recording, in every sparse layer
    of ``config`` (its sinks, window and dense layers), the queries each head sends and the
    centred middle keys it was given; returns the cosines of (query head, its KV head's keys)
    pairs, subsampled to at most ``max_pairs``.
    """
    from magicpig.attention import baselines

    records: list[torch.Tensor] = []

    class _Recorder(baselines.DenseMiddle):
        """Exact attention that also keeps the cosines of the queries it answers."""

        def _attend_one(self, seq_id, q, kv_of):
            keys = torch.nn.functional.normalize(self._keys[seq_id], dim=-1)
            qn = torch.nn.functional.normalize(q, dim=-1)
            hkv, n, d = keys.shape
            records.append(torch.einsum("hgd,hnd->hgn", qn.view(hkv, -1, d), keys).flatten())
            return super()._attend_one(seq_id, q, kv_of)

    # A sparse config (so layers are offloaded with centred keys, as the store sees them)
    # whose middle attention, for this session only, is the exact recorder.
    cfg = config.replace(method="topk", budget=1.0)
    state = prefill(loaded.model, [list(token_ids)], progress=False)
    with DecodeSession(loaded.model, state, cfg, steps, method_factory=_Recorder) as session:
        tokens = state.last_logits.argmax(-1)
        for _ in range(steps):
            tokens = session.step(tokens).argmax(-1)
    if not records:
        raise ValueError("no middle keys were attended: the prompt is shorter than sinks + window")
    cos = torch.cat(records)
    if cos.numel() > max_pairs:
        g = torch.Generator().manual_seed(seed)
        cos = cos[torch.randperm(cos.numel(), generator=g)[:max_pairs]]
    return cos


# ----------------------------------------------------------------------------- a model's default (K, L, m)

DEFAULT_COST = 0.025  # fraction of the middle keys read per decode step (the paper's range: 2-4%)
CALIBRATION_TOKENS = 1024  # prompt length: a prefill of seconds on a CPU, enough middle to rank
CALIBRATION_STEPS = 4  # decode steps whose queries are recorded
SEARCH = {"K_range": (6, 14), "min_collisions": (2, 10), "max_tables": 400}
_VERSION = 1  # bump when the procedure changes: older cache entries are then ignored


@dataclass(frozen=True)
class LSHChoice:
    """The (K, L, min_collisions) chosen for a model, and why.

    how: "calibrated" (now), "cached" (an earlier calibration of the same model and settings)
    or "paper" (no calibration could run: ``note`` says why). index_bytes: CPU bytes of hash
    index per middle token and KV head (more tables cost memory).
    """

    K: int
    L: int
    min_collisions: int
    predicted_cost: float
    recall: float
    seconds: float
    how: str
    index_bytes: int
    note: str = ""

    def describe(self) -> str:
        if self.how == "paper":
            return (f"K={self.K}, L={self.L}, min_collisions={self.min_collisions} (the paper's: {self.note}), "
                    f"index {self.index_bytes} B per token and KV head")
        return (f"K={self.K}, L={self.L}, min_collisions={self.min_collisions} ({self.how}: predicted cost "
                f"{100 * self.predicted_cost:.2f}%, recall {self.recall:.2f} of the top pairs), "
                f"index {self.index_bytes} B per token and KV head")


def calibration_prompt(tokenizer: Any, num_tokens: int, seed: int = 0) -> list[int]:
    """Token ids of a chat-formatted prompt of at most ``num_tokens``: sentences of random
    words (wonderwords' lists) holding four "special number" facts, then a question on one, so
    the decode queries look for a few keys among many, as in long-context retrieval."""
    rng = random.Random(seed)
    adjs, nouns = _word_list("adjectivelist.txt"), _word_list("nounlist.txt")
    names = [f"{rng.choice(adjs)} {rng.choice(nouns)}" for _ in range(4)]
    facts = [f"The special number of the {name} is {rng.randint(10000, 99999)}." for name in names]
    question = f"What is the special number of the {names[rng.randrange(4)]}?"
    sentences: list[str] = []
    ids: list[int] = []
    while True:
        sentences.append(f"The {rng.choice(adjs)} {rng.choice(nouns)} sees the {rng.choice(adjs)} {rng.choice(nouns)}.")
        if len(sentences) % 8 == 0:  # re-measure now and then: templates and merges shift counts
            text = _with_facts(sentences, facts) + "\n\n" + question
            longer = _chat_ids(tokenizer, text)
            if len(longer) > num_tokens:
                return ids if ids else longer[-num_tokens:]
            ids = longer


def _with_facts(sentences: list[str], facts: list[str]) -> str:
    """The sentences with the facts spread evenly among them."""
    spots = [len(sentences) * (i + 1) // (len(facts) + 1) for i in range(len(facts))]
    out = list(sentences)
    for spot, fact in reversed(list(zip(spots, facts))):
        out.insert(spot, fact)
    return " ".join(out)


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
    return list(tokenizer(text)["input_ids"])


@lru_cache(maxsize=None)
def _word_list(filename: str) -> tuple[str, ...]:
    text = files("wonderwords.assets").joinpath(filename).read_text(encoding="utf-8")
    return tuple(sorted({w.strip() for w in text.splitlines() if w.strip() and " " not in w.strip()}))


def resolve_lsh(loaded: Any, config: Any) -> tuple[Any, LSHChoice | None]:
    """(``config`` with K, L and min_collisions chosen for ``loaded`` where it leaves them unset
    and samples, the choice), or (``config``, None) when there is nothing to choose."""
    if config.lsh_resolved or config.method != "magicpig":
        return config, None
    choice = default_lsh(loaded, config)
    return config.replace(K=choice.K, L=choice.L, min_collisions=choice.min_collisions), choice


def default_lsh(loaded: Any, config: Any, quiet: bool = False) -> LSHChoice:
    """The (K, L, m) for ``config`` on ``loaded`` (a :class:`magicpig.model.loaded.LoadedModel`):
    the cached choice for this model and these settings, else a calibration (a prefill of
    ``CALIBRATION_TOKENS`` and ``CALIBRATION_STEPS`` decode steps, seconds on a CPU), announced
    on stderr unless ``quiet``. A ``config.min_collisions`` that is set is kept."""
    m_range = SEARCH["min_collisions"] if config.min_collisions is None else (config.min_collisions,) * 2
    key = _cache_key(loaded, config, m_range)
    path = cache_dir() / "calibration" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    cached = _read_choice(path, key)
    if cached is not None:
        return cached
    tokens = min(CALIBRATION_TOKENS, loaded.args.max_context - CALIBRATION_STEPS - 1)
    why = ("the model has too few positions to calibrate" if tokens < config.sink_tokens + config.window_tokens + 256
           else "the model has no tokenizer" if loaded.tokenizer is None else "")
    if why:
        K, L, m = PAPER_LSH
        m = m if config.min_collisions is None else min(config.min_collisions, L)
        return LSHChoice(K, L, m, float("nan"), float("nan"), 0.0, "paper", index_bytes_per_token_head(K, L), why)
    if not quiet:
        print(f"magicpig: choosing K, L, min_collisions for {loaded.source or 'this model'} "
              f"(once; cached in {path.parent})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cos = model_cosines(loaded, calibration_prompt(loaded.tokenizer, tokens), config, steps=CALIBRATION_STEPS)
    best = ranked_options(cos, DEFAULT_COST, SEARCH["K_range"], m_range, SEARCH["max_tables"])[0]
    choice = LSHChoice(best.K, best.L, best.min_collisions, best.predicted_cost, best.recall,
                       time.perf_counter() - t0, "calibrated", index_bytes_per_token_head(best.K, best.L))
    _write_choice(path, key, choice)
    if not quiet:
        print(f"magicpig: {choice.describe()}, in {choice.seconds:.1f} s", file=sys.stderr, flush=True)
    return choice


def _cache_key(loaded: Any, config: Any, m_range: tuple[int, int]) -> dict:
    """Everything the choice depends on: the model (source, shapes, a fingerprint of its
    embedding weights), the settings that shape the middle, and this procedure."""
    emb = loaded.model.embed_weight.detach().flatten()[:4096].float().cpu().numpy().tobytes()
    return {
        "version": _VERSION, "source": str(loaded.source), "args": repr(loaded.args),
        "weights": hashlib.sha256(emb).hexdigest()[:16],
        "sink_tokens": config.sink_tokens, "window_tokens": config.window_tokens,
        "dense_layers": list(config.resolve_dense_layers(loaded.args.num_layers)), "seed": config.seed,
        "cost": DEFAULT_COST, "tokens": CALIBRATION_TOKENS, "steps": CALIBRATION_STEPS,
        "search": {**SEARCH, "min_collisions": list(m_range)},
    }


def _read_choice(path: Path, key: dict) -> LSHChoice | None:
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") != json.loads(json.dumps(key)):
            return None
        return replace(LSHChoice(**entry["choice"]), how="cached")
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent or damaged: calibrate again (and overwrite it)


def _write_choice(path: Path, key: dict, choice: LSHChoice) -> None:
    """Atomically (a temporary file renamed), so concurrent processes never read half a file;
    an unwritable cache only costs the next load another calibration."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "choice": asdict(choice)}, f, indent=1)
        os.replace(tmp, path)
    except OSError as err:
        print(f"magicpig: could not cache the LSH choice in {path} ({err})", file=sys.stderr)
