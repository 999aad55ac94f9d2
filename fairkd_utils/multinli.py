"""MultiNLI with negation groups, read from a local folder: the text study's data
conventions, the negation attribute and the reader.

Every text dataset (this reader's and the miniature's, :mod:`.synthetic_text`) is a
:class:`~fairkd_utils.data.GroupDataset` whose ``x`` is a LongTensor ``(N, 2, L)``:
row 0 the input ids (``[CLS] premise [SEP] hypothesis [SEP]``, then padding), row 1
the token type ids (0 for ``[CLS]``, the premise and its ``[SEP]``; 1 for the
hypothesis and its ``[SEP]``; 0 on padding). Padding is the tokenizer's pad id -- 0
for BERT and for the miniature -- and the attention mask is ``input_ids != pad`` (the
models of :mod:`.text_models` read the pad id from their config); each dataset
carries its ``pad_id`` and its ``vocab_size`` (ids are ``0 .. vocab_size - 1``). Three
classes, two attribute values, six groups ``g = 2*y + a``:

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
:data:`MULTINLI_LAYOUT`; no line or text field longer than :data:`MAX_TEXT_CHARS`) and
:func:`tokenize_pairs`. The tokenizer is passed in (e.g.
``text_models.load_tokenizer``); this module never imports ``transformers``.
"""

from __future__ import annotations

import collections
import csv
import json
import string
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .data import SPLITS, GroupDataset, _parse_split, _read_csv, _require_columns, _subsample

__all__ = ["MULTINLI_LABELS", "NEGATION_WORDS", "MULTINLI_GROUP_NAMES", "MULTINLI_COUNTS",
           "MULTINLI_LAYOUT", "MAX_TEXT_CHARS", "negation_attribute", "read_multinli",
           "tokenize_pairs"]

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
      matched, dev mismatched; '-' lines counted, then left out by the metadata)
every line and every text field at most 100,000 characters"""

#: The longest line, and the longest text field, any MultiNLI file may hold (characters):
#: far beyond any sentence pair, so a longer one is a damaged file (an unclosed quote, a
#: lost line break). Lines are checked as they are read, before a huge one is parsed or
#: tokenised (one 10 MB line otherwise costs gigabytes).
MAX_TEXT_CHARS = 100_000

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
    Hugging Face tokenizer, e.g. ``text_models.load_tokenizer``) as ``(premise, hypothesis)``,
    truncated to ``max_length`` tokens and padded to the split's longest pair, into the
    ``(N, 2, L)`` layout of this module. Each dataset keeps its text as ``ds.texts``
    (premise, hypothesis), its pad id as ``ds.pad_id`` and the tokenizer's vocabulary
    size (``len(tokenizer)``, what a model built for these ids needs) as ``ds.vocab_size``.

    Checks, each failure naming the file and the fix: the folder and files exist, the
    columns are there, the file is UTF-8 and parses, no line or text field is longer
    than :data:`MAX_TEXT_CHARS`, every label is known, no ``(premise, hypothesis)`` pair
    is repeated within a split or shared between splits -- compared as the tokenizer
    reads them, so copies differing only in case or spacing are copies
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
    frame = _check_duplicates(frame, source, duplicates, tokenizer)
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
        ds.vocab_size = len(tokenizer)
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


def _bounded_lines(fh, path: Path) -> Iterator[str]:
    """The lines of the open text file ``fh``, each refused (naming the file and the
    line) when longer than :data:`MAX_TEXT_CHARS`; at most that many characters of a
    line are read before the check, so a huge line never sits in memory whole. A file
    that is not UTF-8 is refused too, naming the first bad byte."""
    try:
        for n, line in enumerate(iter(lambda: fh.readline(MAX_TEXT_CHARS + 3), ""), start=1):
            if len(line.rstrip("\r\n")) > MAX_TEXT_CHARS:
                raise ValueError(f"{str(path)!r} line {n} is longer than {MAX_TEXT_CHARS:,} "
                                 f"characters; no sentence pair is that long: the file is damaged "
                                 f"there (an unclosed quote or a lost line break?) -- repair or "
                                 f"remove that line\n{MULTINLI_LAYOUT}")
            yield line
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it "
                         f"with UTF-8 encoding (MultiNLI's own files are)\n{MULTINLI_LAYOUT}") from None


def _read_text_csv(path: Path, **kwargs) -> pd.DataFrame:
    """``data._read_csv`` for text: every field a string (no 'NA' -> NaN), every line
    checked against :data:`MAX_TEXT_CHARS` (and the file against UTF-8) first."""
    with open(path, encoding="utf-8", newline="") as fh:
        collections.deque(_bounded_lines(fh, path), maxlen=0)      # read (check) every line
    return _read_csv(path, MULTINLI_LAYOUT, what="sentence pair", dtype=str,
                     keep_default_na=False, na_filter=False, **kwargs)


def _read_table_layout(path: Path) -> pd.DataFrame:
    df = _read_text_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    df.columns = [str(c).strip() for c in df.columns]
    _require_columns(df, ["premise", "hypothesis", "gold_label", "split"], path, MULTINLI_LAYOUT)
    if len(df) == 0:
        raise ValueError(f"{str(path)!r} lists no sentence pairs\n{MULTINLI_LAYOUT}")
    where = [f"line {n}" for n in range(2, len(df) + 2)]
    longest = np.max([df[c].str.len().to_numpy() for c in df.columns], axis=0)
    if (longest > MAX_TEXT_CHARS).any():                 # a quoted field over several lines
        raise ValueError(f"{str(path)!r}: the row near {where[np.argmax(longest > MAX_TEXT_CHARS)]} "
                         f"has a field longer than {MAX_TEXT_CHARS:,} characters; no sentence "
                         f"pair is that long: an unclosed quote? repair that row\n{MULTINLI_LAYOUT}")
    id_col = next((c for c in ("id", "pairID") if c in df.columns), None)
    return pd.DataFrame({
        "premise": df["premise"].to_numpy(), "hypothesis": df["hypothesis"].to_numpy(),
        "label": df["gold_label"].to_numpy(), "id": df[id_col].astype(str).to_numpy() if id_col else where,
        "split": _parse_split(df["split"], path, MULTINLI_LAYOUT).to_numpy(), "where": where})


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
    texts = [r for stem in _MNLI_FILES for r in _read_mnli_file(root, stem)]
    if row.max() >= len(texts):
        raise ValueError(
            f"{str(meta_path)!r} refers to row {int(row.max())}, but the three MultiNLI files hold "
            f"{len(texts)} rows: these are not the MultiNLI 1.0 files the metadata was made from "
            f"(train, dev_matched, dev_mismatched, every line kept)\n{MULTINLI_LAYOUT}")
    frame = pd.DataFrame([texts[i] for i in row], columns=["label", "premise", "hypothesis", "id", "where"])
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
    return frame


def _read_mnli_file(root: Path, stem: str) -> list[tuple]:
    """Rows ``(gold_label, sentence1, sentence2, pairID, where)`` of one MultiNLI 1.0 file,
    every line in order (.jsonl preferred, else the tab-separated .txt)."""
    for folder in (root, root / "multinli_1.0"):
        for path, read in ((folder / f"{stem}.jsonl", _read_jsonl), (folder / f"{stem}.txt", _read_mnli_txt)):
            if path.is_file():
                return read(path)
    raise FileNotFoundError(f"MultiNLI file {str(root / 'multinli_1.0' / (stem + '.jsonl'))!r} (or "
                            f".txt, in ROOT or ROOT/multinli_1.0) not found\n{MULTINLI_LAYOUT}")


def _read_jsonl(path: Path) -> list[tuple]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(_bounded_lines(fh, path), start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append((str(r["gold_label"]), str(r["sentence1"]), str(r["sentence2"]),
                             str(r.get("pairID", f"{path.name}:{n}")), f"{path.name} line {n}"))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{str(path)!r} line {n} is not a MultiNLI JSON record with "
                                 f"gold_label, sentence1, sentence2 ({type(exc).__name__}: {exc}); "
                                 f"use the unmodified MultiNLI 1.0 file\n{MULTINLI_LAYOUT}") from None
    return rows


def _read_mnli_txt(path: Path) -> list[tuple]:
    rows = []
    need = ("gold_label", "sentence1", "sentence2")
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(_bounded_lines(fh, path), delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader, None)
            if header is None or any(c not in header for c in need):
                raise ValueError(f"{str(path)!r} lacks the header columns {list(need)}\n"
                                 f"{MULTINLI_LAYOUT}")
            col = {c: header.index(c) for c in need + ("pairID",) if c in header}
            for n, r in enumerate(reader, start=2):
                if len(r) <= max(col[c] for c in need):
                    raise ValueError(f"{str(path)!r} line {n} has {len(r)} fields; use the "
                                     f"unmodified MultiNLI 1.0 file\n{MULTINLI_LAYOUT}")
                has_id = "pairID" in col and len(r) > col["pairID"]
                rows.append((*(r[col[c]] for c in need), r[col["pairID"]] if has_id else f"{path.name}:{n}",
                             f"{path.name} line {n}"))
        except csv.Error as exc:                          # e.g. a field over csv's own limit
            raise ValueError(f"{str(path)!r} line {reader.line_num} cannot be read as tab-separated "
                             f"fields ({exc}); use the unmodified MultiNLI 1.0 file\n"
                             f"{MULTINLI_LAYOUT}") from None
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
    frame = frame.astype({"premise": str, "hypothesis": str})
    frame["y"] = label.map({s: i for i, s in enumerate(MULTINLI_LABELS)}).astype(np.int64).to_numpy()
    frame["a"] = negation_attribute(frame["hypothesis"].tolist())
    return frame.reset_index(drop=True)


def _check_duplicates(frame: pd.DataFrame, source: Path, mode: str, tokenizer) -> pd.DataFrame:
    """No (premise, hypothesis) pair twice in a split (it would count twice) or in two
    splits (leakage); compared as the model reads them, by the token ids of premise and
    hypothesis (whole, not truncated: at most :data:`MAX_TEXT_CHARS` characters each, as
    read; no special tokens) under ``tokenizer``: copies that differ only in what the
    tokenizer normalises away (case and accents for an uncased one, spacing) are the
    same pair."""
    premises, hypotheses = (tokenizer(frame[c].tolist(), add_special_tokens=False, truncation=False,
                                      verbose=False)["input_ids"] for c in ("premise", "hypothesis"))
    key = pd.Series([" ".join(map(str, p)) + "|" + " ".join(map(str, h))
                     for p, h in zip(premises, hypotheses)], index=frame.index)
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
    where, why, what, keep = (
        ("in more than one split", "which leaks evaluation data into training", "copies",
         "each pair's first occurrence in the order train, val, test") if leaks else
        ("more than once within a split", "so they would count twice", "repeats", "the first"))
    raise ValueError(
        f"{str(source)!r}: {len(leaks or groups)} (premise, hypothesis) pair(s) occur {where} "
        f"(compared as the tokenizer reads them: case and spacing may differ), {why}, e.g.\n"
        f"  {shown}\nremove the {what} (or pass duplicates='drop' to keep {keep})\n{MULTINLI_LAYOUT}")


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

