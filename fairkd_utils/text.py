"""The text side of the study: MultiNLI with negation groups, its miniature, and BERT
teachers and early-exit students that plug into the image study's training loop.

Every text dataset is a :class:`~fairkd_utils.data.GroupDataset` whose ``x`` is a
LongTensor ``(N, 2, L)``: row 0 the input ids (``[CLS] premise [SEP] hypothesis
[SEP]``, then padding), row 1 the token type ids (0 for ``[CLS]``, the premise and
its ``[SEP]``; 1 for the hypothesis and its ``[SEP]``; 0 on padding). Padding is the
tokenizer's pad id -- 0 for BERT and for the miniature -- and the attention mask is
``input_ids != pad`` (the models read the pad id from their config). Three classes,
two attribute values, six groups ``g = 2*y + a``:

* **labels** ``y``, group_DRO's MultiNLI convention (kohpangwei/group_DRO,
  ``data/multinli_dataset.py`` docstring and ``dataset_scripts/generate_multinli.py``,
  ``label_dict``): 0 contradiction, 1 entailment, 2 neutral;
* **attribute** ``a`` = ``sentence2_has_negation``: 1 when the hypothesis holds one of
  group_DRO's negation words ``nobody, no, never, nothing`` (taken there from
  Gururangan et al. 2018, arXiv 1803.02324) as a word -- see
  :func:`negation_attribute` for exactly what counts as a word;
* **groups**: group_DRO's ``group_array = y * (n_groups / n_classes) + confounder``,
  i.e. ``g = 2*y + a``, named :data:`MULTINLI_GROUP_NAMES`.

Pieces: :func:`negation_attribute`; :func:`read_multinli` (a local folder, layouts in
:data:`MULTINLI_LAYOUT`); :func:`make_synthetic_text` and
:func:`make_text_pretraining_corpus` (the miniature) and :func:`decode_pairs`;
:func:`bert_config`, :func:`build_text_teacher`, :func:`build_text_student` (tiny
encoders from code) and :func:`load_tokenizer`, :func:`load_text_teacher`,
:func:`load_text_student` (local Hugging Face folders, never a download).

``transformers`` is imported inside the functions that need it (the optional extra
``text``): importing this module, reading the constants and computing the negation
attribute work without it, and the image study never needs it.
"""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import SPLITS, GroupDataset, _parse_split, _read_csv, _require_columns, _subsample
from .models import ExitHead, StudentOutput, _seeded

__all__ = [
    "MULTINLI_LABELS", "NEGATION_WORDS", "MULTINLI_GROUP_NAMES", "MULTINLI_COUNTS",
    "MULTINLI_LAYOUT", "SYNTHETIC_TEXT_DIVISOR", "negation_attribute", "read_multinli",
    "tokenize_pairs", "TextTeacher", "TextEarlyExitStudent", "bert_config",
    "build_text_teacher", "build_text_student", "load_tokenizer", "load_text_teacher",
    "load_text_student", "SyntheticVocab", "synthetic_text_vocab", "synthetic_text_counts",
    "synthetic_text_length", "synthetic_text_rule", "make_synthetic_text",
    "make_text_pretraining_corpus", "decode_pairs", "VAGUE_WORDS", "synthetic_text_word_weights",
]

# --------------------------------------------------------------------------- conventions

#: ``y`` is the index: group_DRO's ``label_dict`` (contradiction 0, entailment 1, neutral 2).
MULTINLI_LABELS = ("contradiction", "entailment", "neutral")
#: group_DRO's negation words (its ``negation_words``), from Gururangan et al. (2018).
NEGATION_WORDS = ("nobody", "no", "never", "nothing")
#: Group ``g = 2*y + a``.
MULTINLI_GROUP_NAMES = [f"{label}, {neg}" for label in MULTINLI_LABELS
                        for neg in ("no negation", "negation")]

#: MultiNLI's group counts under group_DRO's random 50/20/30 resplit
#: (``metadata_random.csv``), index ``g = 2*y + a`` as in :data:`MULTINLI_GROUP_NAMES`.
#: The metadata file itself is too large for the copy of group_DRO available here; these
#: counts are the ``n_train`` / ``n_val`` / ``n_test`` lists of group_DRO's MultiNLI
#: experiments as hard-coded in a public analysis script of those runs, and they check
#: out: the three splits hold 206,175 + 82,462 + 123,712 = 412,349 pairs = MultiNLI 1.0's
#: 392,702 + 9,815 + 9,832 pairs with a gold label, and 206,175 / 412,349 = 0.50,
#: 82,462 / 412,349 = 0.20 -- the script's 50/20/30 split of all 412,702 rows before the
#: 353 rows without consensus ('-') are dropped. Validation and test are *not*
#: group-balanced (unlike Waterbirds'): they keep the training split's proportions.
MULTINLI_COUNTS = {
    "train": (57498, 11158, 67376, 1521, 66630, 1992),
    "val": (22814, 4634, 26949, 613, 26655, 797),
    "test": (34597, 6655, 40496, 886, 39930, 1148),
}

MULTINLI_LAYOUT = """expected layout, one of
(a) one table (your own export of MultiNLI, or any NLI data):
  ROOT/multinli.csv  (or ROOT/multinli.tsv, tab-separated; not both)
      columns premise, hypothesis, gold_label, split  (others, e.g. pairID, are kept as ids
      when named id or pairID, else ignored); UTF-8, standard CSV quoting
      gold_label: entailment / neutral / contradiction (text; rows labelled '-' have no
                  annotator consensus: drop them, as group_DRO does)
      split: train / val / test, or 0 / 1 / 2
(b) MultiNLI 1.0 as distributed, plus group_DRO's split file:
  ROOT/metadata_random.csv   group_DRO's dataset_metadata/multinli/metadata_random.csv
                             (or pass metadata="metadata_preset.csv"); first column the
                             row number, then gold_label (0/1/2), sentence2_has_negation, split
  ROOT/[multinli_1.0/]multinli_1.0_train.jsonl          (or the .txt versions)
  ROOT/[multinli_1.0/]multinli_1.0_dev_matched.jsonl
  ROOT/[multinli_1.0/]multinli_1.0_dev_mismatched.jsonl
      metadata row i is line i of these three files read in this order (train, dev
      matched, dev mismatched; '-' lines counted, then left out by the metadata)"""

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NEGATION_SET = frozenset(NEGATION_WORDS)


def negation_attribute(hypotheses: Iterable[str]) -> np.ndarray:
    """``sentence2_has_negation`` of each hypothesis: 1 when it holds a negation word.

    Exactly group_DRO's rule (``generate_multinli.py``: ``tokenize`` and the loop over
    ``negation_words``), so the attribute equals the one in its ``metadata_*.csv``:
    delete ASCII punctuation (``string.punctuation``; deleted, not replaced by a space),
    lower-case, split on single spaces, and test each of ``nobody, no, never, nothing``
    for membership among the words. Consequences, all as in the benchmark:

    * "I know it" -> 0: "no" inside a word is not the word "no" (nor "nobody" "no").
    * "No, never." / "nobody." / "NEVER" -> 1: punctuation goes, case is folded.
    * "nothing's changed" -> **0**: the apostrophe is deleted, leaving the word
      "nothings". Linguistically it negates, but the published groups do not count it,
      and a reader that did would move pairs between groups and no longer reproduce
      group_DRO's group counts (or pass :func:`read_multinli`'s check against its
      metadata), so we keep the benchmark's attribute. Likewise "no-one" -> "noone" -> 0.
    * Only single spaces separate words: "no\\tway" is the one word "no\\tway" -> 0;
      non-ASCII quotes stay attached ("\u201cNo" -> 0).

    ``hypotheses``: an iterable of strings (a bare string is refused: it would be read
    character by character). Returns an int64 array of 0/1.
    """
    if isinstance(hypotheses, (str, bytes)):
        raise TypeError("negation_attribute takes a list of hypotheses, not one string; "
                        "wrap it: negation_attribute([text])")
    out = []
    for i, s in enumerate(hypotheses):
        if not isinstance(s, str):
            raise TypeError(f"hypothesis {i} is {type(s).__name__}, not str: {s!r}")
        out.append(not _NEGATION_SET.isdisjoint(s.translate(_PUNCTUATION).lower().split(" ")))
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- reading MultiNLI


def read_multinli(root, tokenizer, max_length: int = 128, *, scale: float = 1.0, seed: int = 0,
                  metadata: str = "metadata_random.csv",
                  duplicates: str = "error") -> dict[str, GroupDataset]:
    """MultiNLI (or any NLI table) from a local folder as train/val/test GroupDatasets.

    Two layouts, see :data:`MULTINLI_LAYOUT`: (a) one table ``multinli.csv``/``.tsv``;
    (b) the MultiNLI 1.0 files plus group_DRO's ``metadata_random.csv``. Layout (b)
    follows from group_DRO's ``generate_multinli.py``: it concatenates
    ``multinli_1.0_train``, ``_dev_matched`` and ``_dev_mismatched`` (``ignore_index``,
    so rows are numbered 0.. across the three files in that order), drops rows whose
    gold label is '-' *keeping* the numbers, and writes the frame with its index as the
    first column. So metadata row ``i`` is line ``i`` of the concatenation. The reader
    checks this mapping on every row: the text's gold label and its
    :func:`negation_attribute` must equal the metadata's ``gold_label`` and
    ``sentence2_has_negation``; any other file order or version fails loudly.

    The attribute is computed from the hypothesis with :func:`negation_attribute`
    (layout (a) has no attribute column). Pairs are tokenised with ``tokenizer`` (a
    Hugging Face tokenizer, e.g. :func:`load_tokenizer`) as ``(premise, hypothesis)``,
    truncated to ``max_length`` tokens and padded to the split's longest pair, into the
    ``(N, 2, L)`` layout of this module. Each dataset keeps its text as ``ds.texts``
    (premise, hypothesis) and its pad id as ``ds.pad_id``.

    Checks, each failure naming the file and the fix: the folder and files exist, the
    columns are there, the file is UTF-8 and parses, every label is known, no
    ``(premise, hypothesis)`` pair is repeated within a split or shared between splits
    (``duplicates="drop"`` instead keeps each pair's first occurrence, in the order
    train, val, test), and every split holds every one of the six groups.
    ``scale`` < 1 keeps that fraction of every group (each >= 1), chosen by ``seed``.
    """
    if duplicates not in ("error", "drop"):
        raise ValueError(f"duplicates must be 'error' or 'drop', got {duplicates!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if not int(max_length) >= 3:
        raise ValueError(f"max_length must be >= 3 ([CLS] and two [SEP]), got {max_length}")
    if root is None:
        raise ValueError(f"read_multinli reads a local folder: pass root=PATH\n{MULTINLI_LAYOUT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"MultiNLI data root {str(root)!r} does not exist or is not a "
                                f"folder\n{MULTINLI_LAYOUT}")
    tables = [root / f"multinli.{ext}" for ext in ("csv", "tsv") if (root / f"multinli.{ext}").is_file()]
    if len(tables) == 2:
        raise ValueError(f"both {str(tables[0])!r} and {str(tables[1])!r} exist; keep one of "
                         f"them\n{MULTINLI_LAYOUT}")
    if tables:
        frame, source = _read_table_layout(tables[0]), tables[0]
    elif (root / metadata).is_file():
        frame, source = _read_group_dro_layout(root, root / metadata), root / metadata
    else:
        raise FileNotFoundError(
            f"no MultiNLI data in {str(root)!r}: neither {str(root / 'multinli.csv')!r} (or "
            f".tsv) nor {str(root / metadata)!r} exists\n{MULTINLI_LAYOUT}")
    frame = _labels_and_attribute(frame, source)
    frame = _check_duplicates(frame, source, duplicates)
    _check_text_groups(frame, source)
    kept = {split: frame[frame["split"] == split] for split in SPLITS}
    if scale < 1:
        kept = {split: _subsample(m, 2, scale, seed, split) for split, m in kept.items()}
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token (pad_token_id is None); use a BERT-style "
                         "tokenizer or set tokenizer.pad_token")
    out = {}
    for split, m in kept.items():
        x = tokenize_pairs(tokenizer, m["premise"].tolist(), m["hypothesis"].tolist(), max_length)
        ds = GroupDataset("multinli", split, torch.tensor(m["y"].to_numpy(np.int64)),
                          torch.tensor(m["a"].to_numpy(np.int64)), n_classes=3, n_attrs=2,
                          group_names=MULTINLI_GROUP_NAMES, ids=m["id"].astype(str).tolist(), x=x)
        ds.texts = m[["premise", "hypothesis"]].reset_index(drop=True)
        ds.pad_id = int(pad_id)
        out[split] = ds
    return out


def tokenize_pairs(tokenizer, premises: Sequence[str], hypotheses: Sequence[str],
                   max_length: int = 128) -> torch.Tensor:
    """``(premise, hypothesis)`` pairs -> LongTensor ``(N, 2, L)`` (input ids, token type
    ids), truncated to ``max_length`` (longest first) and padded to the longest pair."""
    if len(premises) != len(hypotheses):
        raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
    if len(premises) == 0:
        raise ValueError("no pairs to tokenise")
    enc = tokenizer(list(premises), list(hypotheses), truncation=True, max_length=int(max_length),
                    padding="longest", return_token_type_ids=True, return_attention_mask=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    types = enc.get("token_type_ids")
    types = torch.zeros_like(ids) if types is None else torch.tensor(types, dtype=torch.long)
    return torch.stack([ids, types], dim=1).contiguous()


def _read_text_csv(path: Path, **kwargs) -> pd.DataFrame:
    """``data._read_csv`` for text: every field a string (no 'NA' -> NaN)."""
    return _read_csv(path, MULTINLI_LAYOUT, what="sentence pair", dtype=str,
                     keep_default_na=False, na_filter=False, **kwargs)


def _read_table_layout(path: Path) -> pd.DataFrame:
    df = _read_text_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    df.columns = [str(c).strip() for c in df.columns]
    _require_columns(df, ["premise", "hypothesis", "gold_label", "split"], path, MULTINLI_LAYOUT)
    if len(df) == 0:
        raise ValueError(f"{str(path)!r} lists no sentence pairs\n{MULTINLI_LAYOUT}")
    lines = np.arange(len(df)) + 2
    id_col = next((c for c in ("id", "pairID") if c in df.columns), None)
    ids = df[id_col].astype(str) if id_col else pd.Series([f"line {n}" for n in lines])
    return pd.DataFrame({
        "premise": df["premise"].to_numpy(), "hypothesis": df["hypothesis"].to_numpy(),
        "label": df["gold_label"].to_numpy(), "id": ids.to_numpy(),
        "split": _parse_split(df["split"], path, MULTINLI_LAYOUT).to_numpy(),
        "where": [f"line {n}" for n in lines],
    })


_MNLI_FILES = ("multinli_1.0_train", "multinli_1.0_dev_matched", "multinli_1.0_dev_mismatched")


def _read_group_dro_layout(root: Path, meta_path: Path) -> pd.DataFrame:
    meta = _read_text_csv(meta_path)
    if meta.shape[1] == 0:
        raise ValueError(f"{str(meta_path)!r} has no columns\n{MULTINLI_LAYOUT}")
    meta = meta.rename(columns={meta.columns[0]: "row"})
    _require_columns(meta, ["row", "gold_label", "sentence2_has_negation", "split"], meta_path,
                     MULTINLI_LAYOUT)
    if len(meta) == 0:
        raise ValueError(f"{str(meta_path)!r} lists no rows\n{MULTINLI_LAYOUT}")
    row = pd.to_numeric(meta["row"], errors="coerce")
    if row.isna().any() or (row < 0).any() or (row != row.round()).any() or row.duplicated().any():
        raise ValueError(f"{str(meta_path)!r}: the first column must hold distinct row numbers "
                         f"0, 1, ... (group_DRO writes the frame's index there)\n{MULTINLI_LAYOUT}")
    row = row.to_numpy().astype(np.int64)
    texts = []
    for stem in _MNLI_FILES:
        texts.extend(_read_mnli_file(root, stem))
    if row.max() >= len(texts):
        raise ValueError(
            f"{str(meta_path)!r} refers to row {int(row.max())}, but the three MultiNLI files hold "
            f"{len(texts)} rows: these are not the MultiNLI 1.0 files the metadata was made from "
            f"(train, dev_matched, dev_mismatched, every line kept)\n{MULTINLI_LAYOUT}")
    picked = [texts[i] for i in row]
    frame = pd.DataFrame(picked, columns=["label", "premise", "hypothesis", "id", "where"])
    frame["split"] = _parse_split(meta["split"], meta_path, MULTINLI_LAYOUT).to_numpy()
    # the mapping check: labels and the negation attribute must be group_DRO's
    y_meta = pd.to_numeric(meta["gold_label"], errors="coerce").to_numpy()
    a_meta = pd.to_numeric(meta["sentence2_has_negation"], errors="coerce").to_numpy()
    y_text = np.array([MULTINLI_LABELS.index(s) if s in MULTINLI_LABELS else -1
                       for s in frame["label"]], dtype=float)
    a_text = negation_attribute(frame["hypothesis"].tolist())
    bad = np.flatnonzero((y_meta != y_text) | (a_meta != a_text))
    if len(bad):
        shown = "\n  ".join(
            f"metadata row {row[i]} ({frame['where'].iat[i]}): gold_label {meta['gold_label'].iat[i]!r} "
            f"vs text {frame['label'].iat[i]!r}, negation {meta['sentence2_has_negation'].iat[i]!r} "
            f"vs {int(a_text[i])} for {frame['hypothesis'].iat[i][:60]!r}" for i in bad[:5])
        raise ValueError(
            f"{str(meta_path)!r} does not match the MultiNLI files in {str(root)!r}: {len(bad)} of "
            f"{len(meta)} rows disagree on the label or the negation attribute, e.g.\n  {shown}\n"
            f"use the MultiNLI 1.0 files the metadata was made from, unmodified (every line, "
            f"'-' rows included)\n{MULTINLI_LAYOUT}")
    frame["label"] = frame["label"].astype(str)
    return frame


def _read_mnli_file(root: Path, stem: str) -> list[tuple]:
    """Rows ``(gold_label, sentence1, sentence2, pairID, where)`` of one MultiNLI 1.0 file,
    every line in order (.jsonl preferred, else the tab-separated .txt)."""
    for folder in (root, root / "multinli_1.0"):
        path = folder / f"{stem}.jsonl"
        if path.is_file():
            return _read_jsonl(path)
        path = folder / f"{stem}.txt"
        if path.is_file():
            return _read_mnli_txt(path)
    raise FileNotFoundError(f"MultiNLI file {str(root / 'multinli_1.0' / (stem + '.jsonl'))!r} (or "
                            f".txt, in ROOT or ROOT/multinli_1.0) not found\n{MULTINLI_LAYOUT}")


def _read_jsonl(path: Path) -> list[tuple]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    rows.append((str(r["gold_label"]), str(r["sentence1"]), str(r["sentence2"]),
                                 str(r.get("pairID", f"{path.name}:{n}")), f"{path.name} line {n}"))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{str(path)!r} line {n} is not a MultiNLI JSON record with "
                                     f"gold_label, sentence1, sentence2 ({type(exc).__name__}: "
                                     f"{exc}); use the unmodified MultiNLI 1.0 file\n"
                                     f"{MULTINLI_LAYOUT}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                         f"use the unmodified MultiNLI 1.0 file\n{MULTINLI_LAYOUT}") from None
    return rows


def _read_mnli_txt(path: Path) -> list[tuple]:
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            need = ("gold_label", "sentence1", "sentence2")
            if header is None or any(c not in header for c in need):
                raise ValueError(f"{str(path)!r} lacks the header columns {list(need)}\n"
                                 f"{MULTINLI_LAYOUT}")
            col = {c: header.index(c) for c in need + ("pairID",) if c in header}
            for n, r in enumerate(reader, start=2):
                if len(r) <= max(col[c] for c in need):
                    raise ValueError(f"{str(path)!r} line {n} has {len(r)} fields; use the "
                                     f"unmodified MultiNLI 1.0 file\n{MULTINLI_LAYOUT}")
                pid = r[col["pairID"]] if "pairID" in col and len(r) > col["pairID"] else f"{path.name}:{n}"
                rows.append((r[col["gold_label"]], r[col["sentence1"]], r[col["sentence2"]], pid,
                             f"{path.name} line {n}"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                         f"use the unmodified MultiNLI 1.0 file\n{MULTINLI_LAYOUT}") from None
    return rows


def _labels_and_attribute(frame: pd.DataFrame, source: Path) -> pd.DataFrame:
    label = frame["label"].astype(str).str.strip().str.lower()
    known = label.isin(MULTINLI_LABELS)
    if not known.all():
        bad = frame.loc[~known]
        values = sorted(set(bad["label"].astype(str)))[:5]
        where = ", ".join(bad["where"].head(3))
        raise ValueError(
            f"{str(source)!r}: {int((~known).sum())} pair(s) have unknown gold label(s) {values} "
            f"(e.g. {where}); use entailment, neutral or contradiction -- rows labelled '-' have "
            f"no annotator consensus: drop them, as group_DRO does\n{MULTINLI_LAYOUT}")
    frame = frame.copy()
    frame["premise"] = frame["premise"].astype(str)
    frame["hypothesis"] = frame["hypothesis"].astype(str)
    frame["y"] = label.map({s: i for i, s in enumerate(MULTINLI_LABELS)}).astype(np.int64).to_numpy()
    frame["a"] = negation_attribute(frame["hypothesis"].tolist())
    return frame.reset_index(drop=True)


def _check_duplicates(frame: pd.DataFrame, source: Path, mode: str) -> pd.DataFrame:
    """No (premise, hypothesis) pair twice in a split (it would count twice) or in two
    splits (leakage); compared after stripping outer whitespace."""
    key = frame["premise"].str.strip() + "\x00" + frame["hypothesis"].str.strip()
    order = frame["split"].map({s: i for i, s in enumerate(SPLITS)})
    if mode == "drop":
        # keep the first occurrence in split order (train, val, test), then file order
        first = ~key.loc[order.sort_values(kind="stable").index].duplicated()
        return frame[first.reindex(frame.index).to_numpy()].reset_index(drop=True)
    dup = frame[key.duplicated(keep=False)]
    if not len(dup):
        return frame
    groups = [d for _, d in dup.groupby(key[dup.index], sort=False)]
    leaks = [d for d in groups if d["split"].nunique() > 1]
    shown = "\n  ".join("; ".join(f"{w} ({s})" for w, s in zip(d["where"], d["split"]))
                        + f": {d['hypothesis'].iat[0][:50]!r}" for d in (leaks or groups)[:5])
    if leaks:
        raise ValueError(
            f"{str(source)!r}: {len(leaks)} (premise, hypothesis) pair(s) occur in more than one "
            f"split, which leaks evaluation data into training, e.g.\n  {shown}\nremove the copies "
            f"(or pass duplicates='drop' to keep each pair's first occurrence in the order train, "
            f"val, test)\n{MULTINLI_LAYOUT}")
    raise ValueError(
        f"{str(source)!r}: {len(groups)} (premise, hypothesis) pair(s) occur more than once within a "
        f"split, so they would count twice, e.g.\n  {shown}\nremove the repeats (or pass "
        f"duplicates='drop' to keep the first)\n{MULTINLI_LAYOUT}")


def _check_text_groups(frame: pd.DataFrame, source: Path) -> None:
    """Every split non-empty and holding all six groups (before any tokenising)."""
    for split in SPLITS:
        m = frame[frame["split"] == split]
        if len(m) == 0:
            raise ValueError(f"{str(source)!r}: split {split!r} has no sentence pairs; every split "
                             f"(train/val/test) needs data\n{MULTINLI_LAYOUT}")
        counts = np.bincount(m["y"].to_numpy() * 2 + m["a"].to_numpy(), minlength=6).tolist()
        empty = [MULTINLI_GROUP_NAMES[g] for g, c in enumerate(counts) if c == 0]
        if empty:
            table = ", ".join(f"{n}: {c}" for n, c in zip(MULTINLI_GROUP_NAMES, counts))
            raise ValueError(
                f"{str(source)!r}: split {split!r} has empty group(s) {empty} (counts {table}); "
                "worst-group metrics need every group (label, negation) in every split -- add "
                f"pairs of those groups\n{MULTINLI_LAYOUT}")


# --------------------------------------------------------------------------- models


def _encoder_inputs(encoder: nn.Module, x: torch.Tensor, pad_id: int) -> dict:
    if x.ndim != 3 or x.shape[1] != 2:
        raise ValueError(f"text models take x of shape (N, 2, L) (input ids, token type ids), "
                         f"got {tuple(x.shape)}")
    max_pos = getattr(encoder.config, "max_position_embeddings", None)
    if max_pos is not None and x.shape[2] > max_pos:
        raise ValueError(f"sequences of {x.shape[2]} tokens, but the encoder has "
                         f"{max_pos} positions; tokenise with max_length <= {max_pos}")
    ids = x[:, 0]
    kwargs = {"input_ids": ids, "attention_mask": (ids != pad_id).long()}
    if (getattr(encoder.config, "type_vocab_size", 0) or 0) > 1:
        kwargs["token_type_ids"] = x[:, 1]
    return kwargs


def _pad_id(encoder: nn.Module) -> int:
    pad = getattr(encoder.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _init_linear(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class TextTeacher(nn.Module):
    """A BERT-like encoder + a linear classifier on the pooled ``[CLS]``:
    ``forward(x) -> logits (N, C)``.

    The pooled ``[CLS]`` is the encoder's pooler output (BERT's tanh layer, what
    ``BertForSequenceClassification`` classifies) when it has a pooler, else the last
    layer's ``[CLS]`` state. Dropout as the encoder's ``hidden_dropout_prob``."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.pad_id = _pad_id(encoder)
        self.dropout = nn.Dropout(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
        self.classifier = _init_linear(nn.Linear(cfg.hidden_size, n_classes),
                                       getattr(cfg, "initializer_range", 0.02))
        self.n_classes = int(n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(**_encoder_inputs(self.encoder, x, self.pad_id))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return self.classifier(self.dropout(pooled))


class TextEarlyExitStudent(nn.Module):
    """A BERT-like encoder with an early exit, the text twin of
    :class:`~fairkd_utils.models.EarlyExitStudent`; ``forward(x) -> StudentOutput``.

    Final head: a linear classifier on the last layer's ``[CLS]`` state (after
    dropout). Early exit: an :class:`~fairkd_utils.models.ExitHead` on ``phi``, the
    hidden state after layer ``exit_layer`` (1-based; 0 would be the embeddings)
    pooled by ``pool``: ``"cls"`` its ``[CLS]`` position, ``"mean"`` the mean over the
    attention mask's tokens. ``phi`` comes from ``output_hidden_states`` of the one
    forward pass (the encoder computes every layer's state anyway; they are only
    returned, not recomputed). With ``detach_exit=True`` (default) the exit trains on
    ``phi.detach()``: it reads what the first layers encode without changing them.
    A pooler the encoder may carry is dropped (``encoder.pooler = None``): unused here.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, exit_layer: int, pool: str = "cls",
                 detach_exit: bool = True):
        super().__init__()
        cfg = encoder.config
        n_layers = int(cfg.num_hidden_layers)
        if isinstance(exit_layer, bool) or int(exit_layer) != exit_layer \
                or not 1 <= int(exit_layer) <= n_layers:
            raise ValueError(f"exit_layer={exit_layer!r} but the student's encoder has layers "
                             f"1..{n_layers}; set the profile's exit_layer in that range")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r}: the exit pools the layer's states by 'cls' (the "
                             "[CLS] position) or 'mean' (mean over the attention mask)")
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.pad_id = _pad_id(encoder)
        self.exit_layer = int(exit_layer)
        self.pool = pool
        self.detach_exit = bool(detach_exit)
        self.dropout = nn.Dropout(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
        self.classifier = _init_linear(nn.Linear(cfg.hidden_size, n_classes),
                                       getattr(cfg, "initializer_range", 0.02))
        self.exit = ExitHead(cfg.hidden_size, n_classes)
        self.n_classes = int(n_classes)

    @property
    def phi_dim(self) -> int:
        return self.exit.in_features

    def forward(self, x: torch.Tensor) -> StudentOutput:
        kwargs = _encoder_inputs(self.encoder, x, self.pad_id)
        out = self.encoder(**kwargs, output_hidden_states=True)
        h = out.hidden_states[self.exit_layer]
        if self.pool == "cls":
            phi = h[:, 0]
        else:
            mask = kwargs["attention_mask"].unsqueeze(-1).to(h.dtype)
            phi = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        if self.detach_exit:
            phi = phi.detach()
        logits = self.classifier(self.dropout(out.last_hidden_state[:, 0]))
        return StudentOutput(logits, self.exit(phi), phi)


def bert_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 2, intermediate_size: int | None = None, max_length: int = 32,
                dropout: float = 0.0, pad_token_id: int = 0):
    """A ``transformers.BertConfig`` built in code (nothing read or downloaded):
    ``intermediate_size`` defaults to ``4 * hidden_size``; ``max_length`` is the number
    of positions; two token types (premise, hypothesis); ``dropout`` for hidden states
    and attention probabilities.

    ``dropout`` defaults to 0 (BERT's is 0.1): the study's training loop draws all its
    randomness from its own seeded generator and never seeds the global RNG (the image
    networks have no dropout), so dropout would make a training run depend on the global
    RNG state -- reruns would differ and a method continuing from the shared warm-up
    would no longer equal its run from scratch."""
    from transformers import BertConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
    return BertConfig(vocab_size=int(vocab_size), hidden_size=int(hidden_size),
                      num_hidden_layers=int(num_layers), num_attention_heads=int(num_heads),
                      intermediate_size=int(intermediate_size or 4 * hidden_size),
                      max_position_embeddings=int(max_length), type_vocab_size=2,
                      hidden_dropout_prob=float(dropout),
                      attention_probs_dropout_prob=float(dropout), pad_token_id=int(pad_token_id))


def build_text_teacher(cfg, n_classes: int, seed: int | None = None) -> TextTeacher:
    """A randomly initialised BERT (``BertModel(cfg)``, with pooler) + classifier;
    ``seed`` fixes the initialisation (the global RNG is left as it was)."""
    from transformers import BertModel

    with _seeded(seed):
        return TextTeacher(BertModel(cfg), n_classes)


def build_text_student(cfg, n_classes: int, exit_layer: int, seed: int | None = None, *,
                       pool: str = "cls", detach_exit: bool = True) -> TextEarlyExitStudent:
    """A randomly initialised BERT (no pooler) with its early exit after ``exit_layer``;
    ``seed`` fixes the initialisation (the global RNG is left as it was)."""
    from transformers import BertModel

    with _seeded(seed):
        return TextEarlyExitStudent(BertModel(cfg, add_pooling_layer=False), n_classes,
                                    exit_layer, pool=pool, detach_exit=detach_exit)


_LOCAL_ONLY = ("nothing is downloaded: put a Hugging Face model folder there (config.json, "
               "model.safetensors or pytorch_model.bin, tokenizer files), e.g. one written by "
               "save_pretrained")


def _model_dir(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder {str(p)!r} does not exist or is not a folder; "
                                f"{_LOCAL_ONLY}")
    return p


def load_tokenizer(path):
    """The tokenizer saved in a local folder (``AutoTokenizer``, ``local_files_only``)."""
    p = _model_dir(path, "tokenizer")
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
    if not any((p / f).is_file() for f in files):
        raise ValueError(f"{str(p)!r} is not a tokenizer folder: none of {list(files)} is there; "
                         f"{_LOCAL_ONLY}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"could not load a tokenizer from {str(p)!r} ({type(exc).__name__}: "
                         f"{str(exc).strip()[:300]}); {_LOCAL_ONLY}") from None


def _load_encoder(path, what: str, dropout: float | None = None):
    p = _model_dir(path, what)
    if not (p / "config.json").is_file():
        raise ValueError(f"{str(p)!r} is not a Hugging Face model folder (no config.json); "
                         f"{_LOCAL_ONLY}")
    from transformers import AutoModel

    kwargs = {}
    if dropout is not None:
        kwargs = {"hidden_dropout_prob": float(dropout),
                  "attention_probs_dropout_prob": float(dropout)}
    try:
        return AutoModel.from_pretrained(str(p), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"could not load a model from {str(p)!r} ({type(exc).__name__}: "
                         f"{str(exc).strip()[:300]}); {_LOCAL_ONLY}") from None


def load_text_teacher(path, n_classes: int, *, seed: int | None = None,
                      dropout: float | None = None) -> TextTeacher:
    """A :class:`TextTeacher` on the encoder saved in a local folder (``AutoModel``,
    ``local_files_only``); the classifier is new, initialised under ``seed``.
    ``dropout`` (BERT-style configs) replaces the checkpoint's dropout probabilities;
    ``None`` keeps them (0.1 for BERT; see :func:`bert_config` on why the study's loop
    wants 0)."""
    encoder = _load_encoder(path, "teacher model", dropout)
    with _seeded(seed):
        return TextTeacher(encoder, n_classes)


def load_text_student(path, n_classes: int, exit_layer: int, pool: str = "cls",
                      detach_exit: bool = True, *, seed: int | None = None,
                      dropout: float | None = None) -> TextEarlyExitStudent:
    """A :class:`TextEarlyExitStudent` on the encoder saved in a local folder; the final
    classifier and the exit are new, initialised under ``seed``; ``dropout`` as in
    :func:`load_text_teacher`."""
    encoder = _load_encoder(path, "student model", dropout)
    with _seeded(seed):
        return TextEarlyExitStudent(encoder, n_classes, exit_layer, pool=pool,
                                    detach_exit=detach_exit)


# --------------------------------------------------------------------------- the miniature

#: scale 1 of the miniature = MultiNLI's group counts divided by this (train 10,310 pairs).
SYNTHETIC_TEXT_DIVISOR = 20
#: P(contradiction | negation) in MultiNLI's training split: 11158 / 14671.
MULTINLI_SPURIOUS_STRENGTH = MULTINLI_COUNTS["train"][1] / sum(MULTINLI_COUNTS["train"][1::2])

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(5)
# Readable antonym pairs for the pseudo-vocabulary (unique, lower-case letters only).
_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("open", "shut"), ("light", "dark"), ("fast", "slow"),
    ("new", "old"), ("wet", "dry"), ("happy", "sad"), ("high", "low"), ("early", "late"),
    ("full", "empty"), ("loud", "quiet"), ("rich", "poor"), ("hard", "soft"),
    ("strong", "weak"), ("clean", "dirty"), ("near", "far"), ("long", "short"),
    ("thick", "thin"), ("sweet", "sour"), ("awake", "asleep"), ("inside", "outside"),
    ("up", "down"), ("left", "right"), ("win", "lose"), ("push", "pull"), ("buy", "sell"),
    ("give", "take"), ("wide", "narrow"), ("deep", "shallow"), ("sharp", "blunt"),
    ("brave", "afraid"), ("calm", "angry"), ("simple", "complex"), ("safe", "risky"),
    ("smooth", "rough"), ("first", "last"), ("north", "south"), ("east", "west"),
    ("day", "night"), ("top", "bottom"), ("come", "go"), ("love", "hate"),
    ("friend", "enemy"), ("true", "false"), ("before", "after"), ("alive", "dead"),
    ("young", "aged"),
]


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


def _vocab_for(n_pairs, n_negation, ambiguous_rate) -> SyntheticVocab:
    """The vocabulary of data drawn with these knobs: vague words only where some pair
    is ambiguous (so data without them keep their ids and size)."""
    return synthetic_text_vocab(n_pairs, n_negation, len(VAGUE_WORDS) if ambiguous_rate > 0 else 0)


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


def synthetic_text_rule(premise: Sequence[int], hypothesis: Sequence[int],
                        vocab: SyntheticVocab) -> int | None:
    """The miniature's label of one pair (token ids; specials, padding and negation
    words are ignored): **contradiction** (0) when a hypothesis word is the antonym of a
    premise word; else **neutral** (2) when a hypothesis word is not in the premise;
    else **entailment** (1: every hypothesis word is in the premise). ``None`` when the
    hypothesis holds a vague word (:data:`VAGUE_WORDS`): the pair does not decide its
    label (an ambiguous pair, see ``ambiguous_rate`` of :func:`make_synthetic_text`)."""
    p = np.asarray(premise)
    h = np.asarray(hypothesis)
    if ((h >= vocab.first_vague) & (h < vocab.size)).any():
        return None
    p = set(p[(p >= vocab.first_content) & (p < vocab.first_vague)].tolist())
    h = h[h >= vocab.first_content]
    if any(int(w) in p for w in vocab.antonym(h)):
        return 0
    if any(int(w) not in p for w in h):
        return 2
    return 1


def _check_text_knobs(vocab: SyntheticVocab, premise_len, hypothesis_len) -> None:
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
    length = synthetic_text_length(premise_len, hypothesis_len)
    x = np.zeros((len(g), 2, length), dtype=np.int64)
    negations = vocab.first_negation + np.arange(vocab.n_negation)
    for i in range(len(g)):
        for _ in range(_MAX_REDRAWS):
            n_p = rng.integers(premise_len[0], premise_len[1] + 1)
            n_h = rng.integers(hypothesis_len[0], hypothesis_len[1] + 1)
            pairs = (rng.permutation(vocab.n_pairs) if weights is None else
                     rng.choice(vocab.n_pairs, n_p + 1, replace=False, p=weights))
            premise = vocab.content(pairs[:n_p], rng.integers(0, 2, n_p))
            pos = rng.permutation(n_p)[:n_h]          # premise words the hypothesis restates
            hyp = premise[pos]
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
    ds.pad_id = PAD
    return ds


def make_synthetic_text(*, scale: float = 1.0, seed: int = 0,
                        spurious_strength: float | None = None, n_pairs: int = 8,
                        n_negation: int = 4, premise_len: tuple = (3, 5),
                        hypothesis_len: tuple = (1, 1), word_zipf: float = 0.0,
                        ambiguous_rate: float = 0.0) -> dict[str, GroupDataset]:
    """``synthetic_text``: a miniature of MultiNLI with its negation shortcut; train, val
    and test GroupDatasets in this module's ``(N, 2, L)`` layout, each split from its own
    sub-seed of ``seed`` (deterministic per seed).

    A pair is ``[CLS] premise [SEP] hypothesis [SEP]`` over a small vocabulary of
    content words in antonym pairs (:class:`SyntheticVocab`, e.g. hot/cold; decoded by
    :func:`decode_pairs`). The premise is a few distinct content words, no two from one
    pair. The **label is the premise-hypothesis relation** (:func:`synthetic_text_rule`,
    100 % determined by it): the hypothesis restates premise words -- all of them
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
      group's and :func:`synthetic_text_rule` gives ``None``. These stand for MultiNLI's
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
    vocab = _vocab_for(n_pairs, n_negation, ambiguous_rate)
    _check_text_knobs(vocab, premise_len, hypothesis_len)
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
    vocab = _vocab_for(n_pairs, n_negation, ambiguous_rate)
    _check_text_knobs(vocab, premise_len, hypothesis_len)
    seen = set()
    for ds in ([] if exclude is None else exclude.values() if isinstance(exclude, dict) else exclude):
        seen.update(row.numpy().tobytes() for row in _trimmed_ids(ds))
    return _synthetic_text_split("synthetic_text_pretrain", "pretrain", [int(n_per_group)] * 6,
                                 vocab, premise_len, hypothesis_len, seed=[int(seed), 100, 20253],
                                 seen=seen, word_zipf=word_zipf, ambiguous_rate=ambiguous_rate)


def _trimmed_ids(ds: GroupDataset):
    """Each pair's input ids without padding, as the generator keys them."""
    ids = ds.x[:, 0]
    for i in range(len(ids)):
        row = ids[i]
        yield row[row != PAD]


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
    words = [[], []]
    for t, k in zip(ids, types):
        if t >= len(_SPECIALS):
            words[k].append(vocab[t])
    return " ".join(words[0]), " ".join(words[1])
