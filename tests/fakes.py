"""Builders of tiny fake dataset folders (Waterbirds, CelebA, own folder) for tests.

Each writes real JPEGs (8x8, some grayscale — CUB has grayscale images too) and the
metadata files in the dataset's own format, and returns the group counts it wrote
per split so tests can compare.
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
