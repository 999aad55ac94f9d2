"""``synthetic_text``: the built-in miniature of MultiNLI with its negation shortcut,
its unbiased pretraining corpus, and a table of example pairs.

Pairs are drawn over a small vocabulary of antonym pairs (:class:`SyntheticVocab`) in
the ``(N, 2, L)`` layout and with the labels, attribute and six groups of
:mod:`.multinli`; the group counts are MultiNLI's scaled down
(:func:`synthetic_text_counts`). Pieces: :func:`make_synthetic_text`,
:func:`make_text_pretraining_corpus` and :func:`decode_pairs` (which also shows the
text of data read by ``multinli.read_multinli``). No ``transformers`` needed.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from .data import SPLITS, GroupDataset
from .multinli import MULTINLI_COUNTS, MULTINLI_GROUP_NAMES

__all__ = ["SYNTHETIC_TEXT_DIVISOR", "VAGUE_WORDS", "SyntheticVocab", "synthetic_text_vocab",
           "synthetic_text_counts", "synthetic_text_length", "synthetic_text_word_weights",
           "make_synthetic_text", "make_text_pretraining_corpus", "decode_pairs"]

#: scale 1 of the miniature = MultiNLI's group counts divided by this (train 10,310 pairs).
SYNTHETIC_TEXT_DIVISOR = 20

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, CLS, SEP = 0, 2, 3   # their places in _SPECIALS
# Readable antonym pairs for the pseudo-vocabulary, word/antonym (unique, lower-case letters only).
_PAIRS = [tuple(pair.split("/")) for pair in """
    hot/cold big/small open/shut light/dark fast/slow new/old wet/dry happy/sad high/low
    early/late full/empty loud/quiet rich/poor hard/soft strong/weak clean/dirty near/far
    long/short thick/thin sweet/sour awake/asleep inside/outside up/down left/right win/lose
    push/pull buy/sell give/take wide/narrow deep/shallow sharp/blunt brave/afraid calm/angry
    simple/complex safe/risky smooth/rough first/last north/south east/west day/night top/bottom
    come/go love/hate friend/enemy true/false before/after alive/dead young/aged
""".split()]


#: The miniature's vague words: a hypothesis made of one says nothing about the premise.
VAGUE_WORDS = ("something", "someone", "somewhere", "stuff")


class SyntheticVocab(NamedTuple):
    """Token ids of the miniature: 0..4 ``[PAD] [UNK] [CLS] [SEP] [MASK]``, then the
    ``n_negation`` negation words (no, never, nothing, nobody), then ``n_pairs``
    antonym pairs of content words, a word and its antonym on adjacent ids, then the
    first ``n_vague`` :data:`VAGUE_WORDS` (none unless the data have ambiguous pairs)."""
    n_pairs: int
    n_negation: int
    n_vague: int = 0

    @property
    def first_negation(self) -> int:
        return len(_SPECIALS)

    @property
    def first_content(self) -> int:
        return len(_SPECIALS) + self.n_negation

    @property
    def first_vague(self) -> int:
        return self.first_content + 2 * self.n_pairs

    @property
    def size(self) -> int:
        return self.first_vague + self.n_vague

    def content(self, pair, side):
        return self.first_content + 2 * np.asarray(pair) + np.asarray(side)

    def antonym(self, ids):
        ids = np.asarray(ids)
        return self.first_content + ((ids - self.first_content) ^ 1)

    def tokens(self) -> list[str]:
        """The pseudo-word of every id (index = id)."""
        words = list(_SPECIALS) + ["no", "never", "nothing", "nobody"][:self.n_negation]
        for k in range(self.n_pairs):
            words += list(_PAIRS[k]) if k < len(_PAIRS) else [f"zo{k}", f"unzo{k}"]
        return words + list(VAGUE_WORDS[:self.n_vague])


def synthetic_text_vocab(n_pairs: int = 8, n_negation: int = 4, n_vague: int = 0) -> SyntheticVocab:
    if not 1 <= int(n_negation) <= 4:
        raise ValueError(f"n_negation must be in 1..4 (no, never, nothing, nobody), got {n_negation}")
    if int(n_pairs) < 2:
        raise ValueError(f"n_pairs must be >= 2, got {n_pairs}")
    if not 0 <= int(n_vague) <= len(VAGUE_WORDS):
        raise ValueError(f"n_vague must be in 0..{len(VAGUE_WORDS)} {VAGUE_WORDS}, got {n_vague}")
    return SyntheticVocab(int(n_pairs), int(n_negation), int(n_vague))


def synthetic_text_counts(split: str, scale: float = 1.0,
                          spurious_strength: float | None = None) -> list[int]:
    """Group counts of a synthetic_text split: MultiNLI's (:data:`MULTINLI_COUNTS`)
    times ``scale / SYNTHETIC_TEXT_DIVISOR``, each >= 1.

    ``spurious_strength`` (train only): P(contradiction | negation). ``None`` keeps
    MultiNLI's 0.761 (its counts exactly); another value keeps each class's size and
    the number of negated pairs, gives that share of them to contradiction and splits
    the rest between entailment and neutral in MultiNLI's ratio (1521 : 1992).
    About 1/3 makes negation nearly independent of the label."""
    if split not in MULTINLI_COUNTS:
        raise ValueError(f"unknown split {split!r}; one of {list(MULTINLI_COUNTS)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    counts = list(MULTINLI_COUNTS[split])
    if split == "train" and spurious_strength is not None:
        s = float(spurious_strength)
        if not 0 < s < 1:
            raise ValueError(f"spurious_strength must be in (0, 1), got {spurious_strength}")
        totals = [counts[2 * y] + counts[2 * y + 1] for y in range(3)]
        n_neg = sum(counts[1::2])
        con = int(round(s * n_neg))
        ent = int(round((n_neg - con) * counts[3] / (counts[3] + counts[5])))
        neg = [con, ent, n_neg - con - ent]
        counts = [c for y in range(3) for c in (totals[y] - neg[y], neg[y])]
    return [max(1, int(round(c * scale / SYNTHETIC_TEXT_DIVISOR))) for c in counts]


def synthetic_text_length(premise_len=(3, 5), hypothesis_len=(1, 1)) -> int:
    """Tokens per synthetic pair (all padded to it): [CLS] premise [SEP] hypothesis,
    one negation word, [SEP] at their longest."""
    return 1 + int(premise_len[1]) + 1 + int(hypothesis_len[1]) + 1 + 1


def _checked_vocab(n_pairs, n_negation, ambiguous_rate, premise_len, hypothesis_len) -> SyntheticVocab:
    """The vocabulary of data drawn with these knobs -- vague words only where some pair
    is ambiguous (so data without them keep their ids and size) -- once the lengths are
    checked against it."""
    vocab = synthetic_text_vocab(n_pairs, n_negation, len(VAGUE_WORDS) if ambiguous_rate > 0 else 0)
    p_lo, p_hi = (int(v) for v in premise_len)
    h_lo, h_hi = (int(v) for v in hypothesis_len)
    if not 1 <= h_lo <= h_hi:
        raise ValueError(f"hypothesis_len must be a range (lo, hi) with 1 <= lo <= hi, got "
                         f"{hypothesis_len}")
    if not p_lo <= p_hi or h_hi > p_lo:
        raise ValueError(f"premise_len {premise_len} must be a range (lo, hi) with lo >= the "
                         f"longest hypothesis ({h_hi}): an entailed hypothesis draws its words "
                         "from the premise")
    if vocab.n_pairs < p_hi + 1:
        raise ValueError(f"n_pairs={vocab.n_pairs} is too small for premises of up to {p_hi} "
                         f"words: a neutral word needs a pair outside the premise (n_pairs >= "
                         f"{p_hi + 1})")
    return vocab


_MAX_REDRAWS = 1000


def synthetic_text_word_weights(n_pairs: int, word_zipf: float = 0.0) -> np.ndarray | None:
    """How often each antonym pair is drawn: ``P(pair k) ~ (k + 1) ** -word_zipf``
    (a Zipf law, as word frequencies in text); ``None`` for 0 (uniform)."""
    z = float(word_zipf)
    if not (np.isfinite(z) and z >= 0):
        raise ValueError(f"word_zipf must be >= 0 (0 = every antonym pair equally often), got {word_zipf}")
    if z == 0:
        return None
    w = np.arange(1, int(n_pairs) + 1, dtype=np.float64) ** -z
    return w / w.sum()


def _synthetic_text_split(name: str, split: str, counts: Sequence[int], vocab: SyntheticVocab,
                          premise_len, hypothesis_len, *, seed, seen: set,
                          word_zipf: float = 0.0, ambiguous_rate: float = 0.0) -> GroupDataset:
    """``counts[g]`` pairs of group g, shuffled, generated from ``seed``. A pair already
    in ``seen`` (drawn before, here or in another split) is drawn again, so no pair
    repeats or leaks between splits; ``seen`` is updated. ``word_zipf``: see
    :func:`synthetic_text_word_weights`; ``ambiguous_rate``: see :func:`make_synthetic_text`."""
    weights = synthetic_text_word_weights(vocab.n_pairs, word_zipf)
    rate = float(ambiguous_rate)
    if not 0 <= rate < 1:
        raise ValueError(f"ambiguous_rate must be in [0, 1) (the share of pairs whose label the "
                         f"pair does not decide), got {ambiguous_rate}")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    g = np.repeat(np.arange(6), np.asarray(counts, dtype=np.int64))
    g = g[rng.permutation(len(g))]
    y, a = g // 2, g % 2
    x = np.zeros((len(g), 2, synthetic_text_length(premise_len, hypothesis_len)), dtype=np.int64)
    negations = vocab.first_negation + np.arange(vocab.n_negation)
    for i in range(len(g)):
        for _ in range(_MAX_REDRAWS):
            n_p = rng.integers(premise_len[0], premise_len[1] + 1)
            n_h = rng.integers(hypothesis_len[0], hypothesis_len[1] + 1)
            pairs = (rng.permutation(vocab.n_pairs) if weights is None else
                     rng.choice(vocab.n_pairs, n_p + 1, replace=False, p=weights))
            premise = vocab.content(pairs[:n_p], rng.integers(0, 2, n_p))
            hyp = premise[rng.permutation(n_p)[:n_h]]  # premise words the hypothesis restates
            if y[i] == 0:                             # contradiction: one word's antonym
                hyp[-1] = vocab.antonym(hyp[-1])
            elif y[i] == 2:                           # neutral: one word from outside the premise
                hyp[-1] = vocab.content(pairs[n_p], rng.integers(0, 2))
            if rate > 0 and rng.random() < rate:      # ambiguous: the changed word is vague
                hyp[-1] = vocab.first_vague + rng.integers(0, vocab.n_vague)
            hyp = hyp[rng.permutation(n_h)]
            if a[i]:                                  # negation: anywhere, independent of the rule
                hyp = np.insert(hyp, rng.integers(0, n_h + 1), rng.choice(negations))
            seq = np.concatenate([[CLS], premise, [SEP], hyp, [SEP]])
            key = seq.tobytes()
            if key not in seen:
                break
        else:
            raise ValueError(
                f"could not draw {len(g)} distinct {name} pairs for split {split!r} (with "
                f"{len(seen)} drawn before): the knobs allow too few different pairs; raise "
                f"n_pairs or the lengths, or lower the scale")
        seen.add(key)
        x[i, 0, :len(seq)] = seq
        x[i, 1, n_p + 2:len(seq)] = 1
    ids = [f"{name}-{split}-{i:05d}" for i in range(len(g))]
    ds = GroupDataset(name, split, torch.from_numpy(y), torch.from_numpy(a), n_classes=3,
                      n_attrs=2, group_names=MULTINLI_GROUP_NAMES, ids=ids, x=torch.from_numpy(x))
    ds.vocab = vocab.tokens()
    ds.vocab_size = vocab.size
    ds.pad_id = PAD
    return ds


def make_synthetic_text(*, scale: float = 1.0, seed: int = 0,
                        spurious_strength: float | None = None, n_pairs: int = 8,
                        n_negation: int = 4, premise_len: tuple = (3, 5),
                        hypothesis_len: tuple = (1, 1), word_zipf: float = 0.0,
                        ambiguous_rate: float = 0.0) -> dict[str, GroupDataset]:
    """``synthetic_text``: a miniature of MultiNLI with its negation shortcut; train, val
    and test GroupDatasets in the ``(N, 2, L)`` layout of :mod:`.multinli`, each split from its own
    sub-seed of ``seed`` (deterministic per seed).

    A pair is ``[CLS] premise [SEP] hypothesis [SEP]`` over a small vocabulary of
    content words in antonym pairs (:class:`SyntheticVocab`, e.g. hot/cold; decoded by
    :func:`decode_pairs`). The premise is a few distinct content words, no two from one
    pair. The **label is the premise-hypothesis relation** (100 % determined by it;
    ``tests/test_text.py`` recomputes it from the ids): the hypothesis restates premise words -- all of them
    (entailment), all but one which is replaced by its antonym (contradiction), or all
    but one which is replaced by a word from a pair absent from the premise (neutral);
    its words are shuffled. So a model must compare the two sentences and learn which
    words are antonyms, as in NLI; no word and no position tells the label by itself.
    The **negation word** (the attribute ``a``) is inserted at a random place of the
    hypothesis *independently of the rule* (it never changes the label), so it is a
    purely spurious feature -- one that a single attention layer sees at once -- and its
    co-occurrence with the labels is MultiNLI's: the group counts are MultiNLI's
    (group_DRO's random split, :data:`MULTINLI_COUNTS`) scaled down, so in train 16 %
    of contradictions carry a negation against 2-3 % of entailments and neutrals, and
    val and test keep those proportions (not group-balanced, as in MultiNLI). No pair
    occurs twice, within a split or across splits (a repeat is drawn again). The knobs:

    * ``scale`` (1.0): data size; scale 1 = MultiNLI / :data:`SYNTHETIC_TEXT_DIVISOR`
      (train 10,310, val 4,124, test 6,185 pairs; the smallest group, entailment with
      negation, has 76 / 31 / 44). Each group keeps >= 1 pair.
    * ``spurious_strength`` (``None`` = MultiNLI's 0.761): in train only,
      P(contradiction | negation); see :func:`synthetic_text_counts`.
    * ``n_pairs`` (8): antonym pairs of content words (vocabulary 5 + ``n_negation`` +
      2 ``n_pairs`` = 25 ids); more pairs = more antonyms to learn, a harder rule.
    * ``word_zipf`` (0): how unevenly the antonym pairs are used. Each pair's words
      are drawn with probability ``~ (k + 1) ** -word_zipf`` (:func:`synthetic_text_word_weights`;
      0 = uniform), as word frequencies follow a Zipf law in real text: the frequent pairs
      come up in many training contradictions and the rare ones in few or none, so a
      model that learns antonyms only from the study's training split cannot know the
      rare ones, while one pretrained on a larger corpus (the teacher) knows more.
    * ``ambiguous_rate`` (0): the share of pairs, in every group alike, whose
      hypothesis word is a vague word (:data:`VAGUE_WORDS`, e.g. "something") instead of
      the restated, opposed or new word: the pair shows no relation, its label is its
      group's and the relation decides nothing. These stand for MultiNLI's
      pairs that the text does not decide (those on which its annotators disagree) and
      where the only cue is how the hypothesis is written -- so every model, the teacher
      included, can do no better there than to read the negation word, and no model
      reaches 100 % on the groups the negation misleads.
    * ``n_negation`` (4): how many distinct negation words (no, never, nothing, nobody).
    * ``premise_len`` ((3, 5)) and ``hypothesis_len`` ((1, 1)): inclusive ranges of
      content words, drawn uniformly per pair (a hypothesis may not be longer than the
      shortest premise, and ``n_pairs`` must exceed the longest premise); sequences are
      padded to :func:`synthetic_text_length` (10 tokens at the defaults).

    The defaults are sized for a 2-core CPU (``bench/bench_text_throughput.py``; an
    epoch of a 64-wide 3-layer student takes about 2.3 s). Measured at seed 0: a
    128-wide 3-layer teacher learns the rule from the unbiased corpus of
    :func:`make_text_pretraining_corpus` (1,700 pairs per group, AdamW lr 5e-4) to
    100 % on every group within 7 epochs; a 64-wide 3-layer ERM student (AdamW lr 1e-3,
    batch 128, 10 epochs) reaches test accuracy 0.94 but leans on the negation word --
    neutral with negation is its worst group (0.53), as in MultiNLI -- and its exit after
    layer 1 predicts contradiction for negated pairs (0.68 right on contradiction with
    negation, 0.02 on neutral with negation). Longer sentences and more pairs (premises
    of 6-10 words, hypotheses of 2-4, 24 pairs) were not learnt by such students within
    that budget (test accuracy 0.39 after 10 epochs).
    """
    vocab = _checked_vocab(n_pairs, n_negation, ambiguous_rate, premise_len, hypothesis_len)
    out, seen = {}, set()
    for k, split in enumerate(SPLITS):
        counts = synthetic_text_counts(split, scale, spurious_strength)
        out[split] = _synthetic_text_split("synthetic_text", split, counts, vocab, premise_len,
                                           hypothesis_len, seed=[int(seed), k, 20252], seen=seen,
                                           word_zipf=word_zipf, ambiguous_rate=ambiguous_rate)
    return out


def make_text_pretraining_corpus(*, n_per_group: int = 1000, seed: int = 0, n_pairs: int = 8,
                                 n_negation: int = 4, premise_len: tuple = (3, 5),
                                 hypothesis_len: tuple = (1, 1), word_zipf: float = 0.0,
                                 ambiguous_rate: float = 0.0, exclude=None) -> GroupDataset:
    """The miniature's unbiased pretraining corpus (the stand-in for BERT's pretraining
    and the teacher's larger data): ``n_per_group`` pairs of each of the six groups, so
    every class carries a negation word exactly half the time -- negation is
    independent of the label and tells nothing. Same generator and knobs as
    :func:`make_synthetic_text` (pass the same ``n_pairs``, ``n_negation`` and lengths),
    an independent seed stream. One GroupDataset, split name ``"pretrain"``. No pair
    repeats; ``exclude`` (GroupDatasets, or a dict of them, e.g. the study's splits
    from :func:`make_synthetic_text`) keeps their pairs out of the corpus too."""
    if int(n_per_group) < 1:
        raise ValueError(f"n_per_group must be >= 1, got {n_per_group}")
    vocab = _checked_vocab(n_pairs, n_negation, ambiguous_rate, premise_len, hypothesis_len)
    seen = set()
    for ds in ([] if exclude is None else exclude.values() if isinstance(exclude, dict) else exclude):
        seen.update(row[row != PAD].numpy().tobytes() for row in ds.x[:, 0])   # as the generator keys
    return _synthetic_text_split("synthetic_text_pretrain", "pretrain", [int(n_per_group)] * 6,
                                 vocab, premise_len, hypothesis_len, seed=[int(seed), 100, 20253],
                                 seen=seen, word_zipf=word_zipf, ambiguous_rate=ambiguous_rate)


def decode_pairs(ds, n_per_group: int = 2) -> pd.DataFrame:
    """Example pairs for a table: the first ``n_per_group`` pairs of every group of
    ``ds`` (a GroupDataset, or a dict of them), as columns split, group_name, premise,
    hypothesis. Synthetic pairs are decoded into their pseudo-words (``ds.vocab``); data
    read by :func:`read_multinli` show their text (``ds.texts``)."""
    datasets = list(ds.values()) if isinstance(ds, dict) else [ds]
    rows = []
    for d in datasets:
        g = d.g.numpy()
        for grp, name in enumerate(d.group_names):
            for i in np.flatnonzero(g == grp)[:n_per_group]:
                premise, hypothesis = _pair_text(d, int(i))
                rows.append({"split": d.split, "group_name": name, "premise": premise,
                             "hypothesis": hypothesis})
    return pd.DataFrame(rows, columns=["split", "group_name", "premise", "hypothesis"])


def _pair_text(ds, i: int) -> tuple[str, str]:
    texts = getattr(ds, "texts", None)
    if texts is not None:
        return str(texts["premise"].iat[i]), str(texts["hypothesis"].iat[i])
    vocab = getattr(ds, "vocab", None)
    if vocab is None:
        raise ValueError(f"{ds!r} carries neither texts nor a vocabulary; decode_pairs reads "
                         "datasets from make_synthetic_text or read_multinli")
    ids, types = ds.x[i, 0].tolist(), ds.x[i, 1].tolist()
    return tuple(" ".join(vocab[t] for t, k in zip(ids, types) if k == side and t >= len(_SPECIALS))
                 for side in (0, 1))
