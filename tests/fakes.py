"""Builders of tiny fake dataset folders (Waterbirds, CelebA, own folder, MultiNLI) and
Hugging Face model folders for tests.

The image builders write real JPEGs (8x8, some grayscale — CUB has grayscale images
too) and the metadata files in the dataset's own format, and return the group counts
they wrote per split so tests can compare. The text builders write a MultiNLI table
and tiny BERT folders (tokenizer, config.json, weights) as save_pretrained does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# per split, group counts g = 2y + a (small but every group non-empty)
DEFAULT_COUNTS = {"train": (5, 2, 1, 4), "val": (2, 2, 1, 1), "test": (3, 3, 2, 2)}
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def write_jpeg(path: Path, seed: int, gray: bool = False, size: int = 8) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path)


def _write_lines(path: Path, lines: list, shuffle_seed=None) -> None:
    """A header and rows; with ``shuffle_seed`` the rows in a shuffled order."""
    rows = lines[1:]
    if shuffle_seed is not None:
        rows = [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]
    path.write_text("\n".join(lines[:1] + rows) + "\n")


def _rows(counts):
    """(split, y, a) for every instance, in a fixed order."""
    out = []
    for split, cs in counts.items():
        for g, c in enumerate(cs):
            out += [(split, g // 2, g % 2)] * c
    return out


def make_fake_waterbirds(root, counts=DEFAULT_COUNTS, shuffle_seed=None) -> dict:
    """ROOT/metadata.csv (img_id, img_filename, y, split, place) and class folders of JPEGs
    (rows shuffled when ``shuffle_seed`` is given)."""
    root = Path(root)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (split, y, a) in enumerate(_rows(counts)):
        fn = f"{'200.Mallard' if y else '001.Sparrow'}/bird_{i:04d}.jpg"
        write_jpeg(root / fn, i, gray=i % 5 == 0)
        lines.append(f"{i + 1},{fn},{y},{SPLIT_CODE[split]},{a},/x/place_{i}.jpg")
    _write_lines(root / "metadata.csv", lines, shuffle_seed)
    return counts


CELEBA_ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Blond_Hair", "Male", "Young"]


def make_fake_celeba(root, fmt: str = "txt", counts=DEFAULT_COUNTS) -> dict:
    """CelebA files with target Blond_Hair (y) and Male (a): the original .txt layout
    (``fmt="txt"``) or Kaggle's .csv one (``fmt="csv"``, images in a nested folder)."""
    root = Path(root)
    img_dir = root / "img_align_celeba"
    if fmt == "csv":
        img_dir = img_dir / "img_align_celeba"
    rows = _rows(counts)
    names = [f"{i + 1:06d}.jpg" for i in range(len(rows))]
    attr_lines, part_lines = [], []
    for i, ((split, y, a), fn) in enumerate(zip(rows, names)):
        write_jpeg(img_dir / fn, 100 + i, gray=i % 7 == 0)
        vals = {"5_o_Clock_Shadow": -1, "Arched_Eyebrows": 1, "Blond_Hair": 2 * y - 1,
                "Male": 2 * a - 1, "Young": 1}
        attr_lines.append((fn, [vals[k] for k in CELEBA_ATTRS]))
        part_lines.append((fn, SPLIT_CODE[split]))
    if fmt == "txt":
        text = [str(len(rows)), " ".join(CELEBA_ATTRS)]
        text += [f"{fn} " + " ".join(f"{v:2d}" for v in vs) for fn, vs in attr_lines]
        (root / "list_attr_celeba.txt").write_text("\n".join(text) + "\n")
        (root / "list_eval_partition.txt").write_text(
            "\n".join(f"{fn} {s}" for fn, s in part_lines) + "\n")
    elif fmt == "csv":
        text = ["image_id," + ",".join(CELEBA_ATTRS)]
        text += [f"{fn}," + ",".join(str(v) for v in vs) for fn, vs in attr_lines]
        (root / "list_attr_celeba.csv").write_text("\n".join(text) + "\n")
        (root / "list_eval_partition.csv").write_text(
            "image_id,partition\n" + "\n".join(f"{fn},{s}" for fn, s in part_lines) + "\n")
    else:
        raise ValueError(f"fmt must be 'txt' or 'csv', got {fmt!r}")
    return counts


def make_fake_folder(root, counts=DEFAULT_COUNTS, split_names: bool = True,
                     shuffle_seed=None) -> dict:
    """ROOT/metadata.csv (filename, split, y, a) beside JPEGs in ROOT/images/ (rows
    shuffled when ``shuffle_seed`` is given)."""
    root = Path(root)
    lines = ["filename,split,y,a"]
    for i, (split, y, a) in enumerate(_rows(counts)):
        fn = f"images/img_{i:04d}.jpg"
        write_jpeg(root / fn, 200 + i, gray=i % 3 == 0)
        lines.append(f"{fn},{split if split_names else SPLIT_CODE[split]},{y},{a}")
    _write_lines(root / "metadata.csv", lines, shuffle_seed)
    return counts


# --------------------------------------------------------------------------- text

#: The fake tokenizer's words (BERT WordPiece, lower-cased): those of the fake pairs,
#: the split names and numbers of their premises included, so no pair reads as [UNK]s.
TEXT_WORDS = ("the a cat dog sat on mat is was here there i know it you they we man woman "
              "park ran walked big small red blue not no never nothing nobody someone always "
              "sleeps eats food house car train val test , . ' s ! ?").split() \
    + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]   # any number: digit pieces
# per split, group counts g = 2*y + a (contradiction, entailment, neutral; odd on purpose)
TEXT_COUNTS = {"train": (7, 5, 9, 1, 8, 3), "val": (3, 1, 2, 1, 4, 1), "test": (5, 3, 4, 2, 3, 1)}
NEG_HYPS = ["nobody sat on the mat .", "No, the dog is not here", "they NEVER ran",
            "nothing is there !"]
POS_HYPS = ["i know the dog .", "nothing's there", "the cat is here", "a big red car"]
MULTINLI_LABELS = ("contradiction", "entailment", "neutral")


def fake_multinli_rows(counts=TEXT_COUNTS, seed=0):
    """One row per pair (pairID, premise, hypothesis, gold_label, split, and the truth
    y, a), unique premises, shuffled; labels written with odd case, splits as names or
    codes."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for split, cs in counts.items():
        for g, c in enumerate(cs):
            y, a = divmod(g, 2)
            for i in range(c):
                label = MULTINLI_LABELS[y]
                rows.append({"pairID": f"{split}-{g}-{i}", "premise": f"the man walked {split} {g} {i}",
                             "hypothesis": (NEG_HYPS if a else POS_HYPS)[i % 4],
                             "gold_label": label.upper() if i % 2 else label,
                             "split": split if i % 3 else SPLIT_CODE[split], "y": y, "a": a})
    df = pd.DataFrame(rows)
    return df.iloc[rng.permutation(len(df))].reset_index(drop=True)


def write_multinli_table(root, df, name="multinli.csv", **kw):
    """``df`` (without its truth columns y, a) as ROOT/multinli.csv (or .tsv)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cols = [c for c in df.columns if c not in ("y", "a")]
    df[cols].to_csv(root / name, index=False, sep="\t" if name.endswith(".tsv") else ",", **kw)
    return root


def make_fake_multinli(root, counts=TEXT_COUNTS) -> dict:
    """ROOT/multinli.csv (layout (a) of ``multinli.MULTINLI_LAYOUT``) of the fake pairs."""
    write_multinli_table(root, fake_multinli_rows(counts))
    return counts


def make_fake_tokenizer_folder(root) -> Path:
    """A BERT WordPiece tokenizer over :data:`TEXT_WORDS`, written with save_pretrained."""
    import transformers

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TEXT_WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(root)
    return root


def make_fake_bert_folder(root, hidden=16, layers=2, heads=2, max_length=130, seed=0) -> Path:
    """A Hugging Face model folder as a user would pass to --teacher-model/--student-model:
    a tiny randomly initialised BertModel (config.json, model.safetensors) beside the
    fake tokenizer."""
    import torch
    import transformers

    root = make_fake_tokenizer_folder(root)
    cfg = transformers.BertConfig(vocab_size=5 + len(TEXT_WORDS), hidden_size=hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=2 * hidden, max_position_embeddings=max_length,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformers.BertModel(cfg).save_pretrained(root)
    return root
