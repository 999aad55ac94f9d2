"""Datasets with groups: every dataset yields ``(x, y, a)`` with group ``g = y*n_attrs + a``.

``synthetic`` ("birds on backgrounds") is built in memory by ``synthetic_images``;
``waterbirds``, ``celeba`` and ``folder`` read a local folder and decode images lazily. ``load_splits`` is the
one entry point; ``iterate_batches`` feeds training loops, ``group_table`` writes
``groups.csv`` and ``to_display`` undoes the normalisation for figures.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .profiles import DATASETS, TEXT_DATASETS  # one list, shared with the runner

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BIRD_GROUP_NAMES = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]
CELEBA_GROUP_NAMES = ["non-blond woman", "non-blond man", "blond woman", "blond man"]

WATERBIRDS_LAYOUT = """expected layout (the waterbird_complete95_forest2water2/ folder):
  ROOT/metadata.csv          columns img_id, img_filename, y, split, place
                             (y: 0 landbird / 1 waterbird; split: 0 train, 1 val, 2 test;
                              place: 0 land / 1 water)
  ROOT/<img_filename>        e.g. ROOT/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"""
CELEBA_LAYOUT = """expected layout (original CelebA text files, or the Kaggle .csv variant):
  ROOT/list_attr_celeba.txt       line 1: image count; line 2: the 40 attribute names
                                  (incl. Blond_Hair, Male); then `filename v1 .. v40` (-1/1)
  ROOT/list_eval_partition.txt    `filename split` with split 0 train / 1 val / 2 test
  ROOT/img_align_celeba/<filename>
or
  ROOT/list_attr_celeba.csv       columns image_id, Blond_Hair, Male, ... (-1/1)
  ROOT/list_eval_partition.csv    columns image_id, partition (0/1/2)
  ROOT/img_align_celeba/[img_align_celeba/]<image_id>"""
FOLDER_LAYOUT = """expected layout (your own data):
  ROOT/metadata.csv     columns filename, split, y, a
                        (split: train/val/test or 0/1/2; y: class 0..C-1; a: spurious 0..A-1)
  ROOT/<filename>       image files, paths relative to ROOT"""


# --------------------------------------------------------------------------- datasets


class GroupDataset(Dataset):
    """A split of a grouped dataset: item ``(x, y, a)``, x float32 (3,H,W) normalised.

    Holds labels ``y`` and spurious attributes ``a`` as LongTensors; ``g = y*n_attrs + a``.
    In-memory datasets also hold ``x`` (N,3,H,W); lazy ones hold ``paths`` and decode
    on access. ``augment`` marks a training split whose batches get random crops/flips.
    """

    def __init__(self, name: str, split: str, y: torch.Tensor, a: torch.Tensor, *,
                 n_classes: int, n_attrs: int, group_names: Sequence[str],
                 ids: Sequence[str], x: torch.Tensor | None = None,
                 paths: Sequence[str] | None = None, image_size: int = 32,
                 augment: bool = False):
        if (x is None) == (paths is None):
            raise ValueError("GroupDataset needs exactly one of x (in memory) or paths (lazy)")
        self.name, self.split = name, split
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.a = torch.as_tensor(a, dtype=torch.long)
        self.n_classes, self.n_attrs = int(n_classes), int(n_attrs)
        self.group_names, self.ids = list(group_names), list(ids)
        self.x, self.paths = x, None if paths is None else list(paths)
        self.image_size, self.augment = int(image_size), bool(augment)
        if len(self.group_names) != self.n_groups:
            raise ValueError(f"{len(self.group_names)} group names for {self.n_groups} groups")

    # -- groups
    @property
    def g(self) -> torch.Tensor:
        return self.y * self.n_attrs + self.a

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attrs

    @property
    def in_memory(self) -> bool:
        return self.x is not None

    def group_counts(self) -> torch.Tensor:
        return torch.bincount(self.g, minlength=self.n_groups)

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}: {c}" for n, c in zip(self.group_names, self.group_counts().tolist()))
        kind = "in memory" if self.in_memory else "lazy"
        return f"GroupDataset({self.name}/{self.split}, n={len(self)}, {kind}, groups {{{counts}}})"

    # -- items
    def __getitem__(self, i):
        """``(x, y, a)``; for lazy data ``i`` may be ``(index, seed)`` to fix augmentation."""
        i, seed = i if isinstance(i, tuple) else (i, None)
        i = int(i)
        x = self.x[i] if self.in_memory else self._load(i, seed)
        return x, int(self.y[i]), int(self.a[i])

    def _load(self, i: int, seed: int | None) -> torch.Tensor:
        from PIL import Image
        import torchvision.transforms.functional as TF

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")  # CUB has grayscale JPEGs
        size = self.image_size
        if self.augment:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            top, left, h, w = _random_resized_crop_params(img.size, gen)
            img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            if torch.rand((), generator=gen) < 0.5:
                img = TF.hflip(img)
        else:
            img = TF.resize(img, int(round(size * 256 / 224)), antialias=True)
            img = TF.center_crop(img, [size, size])
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def _random_resized_crop_params(wh, gen, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's parameters (group_DRO's scale range) drawn from ``gen``."""
    width, height = wh
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*scale, generator=gen))
        ar = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=gen)))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    s = min(width, height)  # fallback: central square crop
    return (height - s) // 2, (width - s) // 2, s, s


# --------------------------------------------------------------------------- entry point


def load_splits(dataset: str, root=None, *, image_size: int = 32, scale: float = 1.0,
                seed: int = 0, augment: bool = False, **knobs) -> dict[str, GroupDataset]:
    """The train/val/test splits of ``dataset`` as GroupDatasets.

    ``seed`` is the *data* seed (synthetic generation, subsampling), independent of
    training seeds. ``scale`` < 1 keeps that fraction of every group (each >= 1).
    ``augment`` enables random crops/flips on the training split. ``knobs`` go to the
    synthetic generator (see ``synthetic_images.make_synthetic``).

    A local folder is checked when opened: every listed image lies inside ``root``, is
    listed once (in one split), exists, and decodes; each failure names the file.
    """
    if dataset not in DATASETS or dataset in TEXT_DATASETS:
        images = [d for d in DATASETS if d not in TEXT_DATASETS]
        raise ValueError(f"unknown dataset {dataset!r} for the image loader; choose one of {images} "
                         "(synthetic needs no files; the others read --data-root; text "
                         "datasets are read by fairkd_utils.multinli and .synthetic_text)")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if dataset == "synthetic":
        from .synthetic_images import make_synthetic  # it builds on GroupDataset, below
        splits = make_synthetic(image_size=image_size, scale=scale, seed=seed, **knobs)
        for ds in splits.values():
            ds.augment = augment and ds.split == "train"
        return splits
    if knobs:
        raise ValueError(f"options {sorted(knobs)} only apply to the synthetic dataset, "
                         f"not to {dataset!r}")
    if root is None:
        raise ValueError(f"dataset {dataset!r} reads a local folder: pass root= "
                         f"(--data-root PATH)\n{_LAYOUTS[dataset]}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} for dataset {dataset!r} does not "
                                f"exist or is not a folder\n{_LAYOUTS[dataset]}")
    meta, n_classes, n_attrs, names, listing = _READERS[dataset](root)
    meta = meta.reset_index(drop=True)
    meta["real"] = _check_inside_root(meta, dataset, root, listing)
    _check_listed_once(meta, dataset, root, listing)
    _check_images_exist(meta["path"].tolist(), dataset, root)
    kept = {split: meta[meta["split"] == split] for split in SPLITS}
    if scale < 1:
        kept = {split: _subsample(m, n_attrs, scale, seed, split) for split, m in kept.items()}
    _check_images_decode(pd.concat(kept.values()), dataset, root, listing)
    out = {split: GroupDataset(dataset, split, torch.tensor(m["y"].to_numpy(np.int64)),
                               torch.tensor(m["a"].to_numpy(np.int64)), n_classes=n_classes,
                               n_attrs=n_attrs, group_names=names, ids=m["id"].astype(str).tolist(),
                               paths=m["path"].tolist(), image_size=image_size,
                               augment=augment and split == "train")
           for split, m in kept.items()}
    _check_groups(out, dataset, root)
    return out


def _subsample(m: pd.DataFrame, n_attrs: int, scale: float, seed: int, split: str):
    """Keep round(scale * n) rows (>= 1) of every group, deterministically per seed."""
    g = m["y"].to_numpy() * n_attrs + m["a"].to_numpy()
    rng = np.random.default_rng([seed, SPLITS.index(split), 7])
    keep = []
    for grp in np.unique(g):
        rows = np.flatnonzero(g == grp)
        k = max(1, int(round(scale * len(rows))))
        keep.extend(np.sort(rng.choice(rows, size=k, replace=False)))
    return m.iloc[np.sort(keep)]


def _check_groups(splits: dict[str, GroupDataset], dataset: str, root) -> None:
    for split, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(f"dataset {dataset!r} at {str(root)!r}: split {split!r} has no "
                             "instances; every split (train/val/test) needs data")
        counts = ds.group_counts().tolist()
        empty = [ds.group_names[i] for i, c in enumerate(counts) if c == 0]
        if empty:
            table = ", ".join(f"{n}: {c}" for n, c in zip(ds.group_names, counts))
            raise ValueError(
                f"dataset {dataset!r} at {str(root)!r}: split {split!r} has empty group(s) "
                f"{empty} (counts {table}); worst-group metrics need every group (y, a) in "
                "every split — add instances or merge the attribute values")


def _check_images_exist(paths: list[str], dataset: str, root: Path) -> None:
    """Fail now, not hours into training, when a listed image is missing."""
    @functools.cache
    def listed(folder: str) -> set:  # each folder is listed once
        try:
            return set(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return set()

    missing = [p for p in paths if os.path.basename(p) not in listed(os.path.dirname(p))]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise FileNotFoundError(
            f"dataset {dataset!r} at {str(root)!r}: {len(missing)} of {len(paths)} listed "
            f"images are missing, e.g.\n  {shown}\n{_LAYOUTS[dataset]}")


def _check_inside_root(meta: pd.DataFrame, dataset: str, root: Path, listing: Path) -> list[str]:
    """The real path of every listed image; each must lie inside the data root (a row
    ``../../x.jpg`` or ``/etc/x.jpg`` would read outside it). Folders' real paths are
    resolved once each; a file is resolved on its own only when it is a link."""
    base = os.path.realpath(root).rstrip(os.sep) + os.sep
    folder = functools.cache(os.path.realpath)
    real = []
    for p in meta["path"]:
        d, f = os.path.split(p)
        q = os.path.join(folder(d), f)
        real.append(os.path.realpath(q) if f in ("", ".", "..") or os.path.islink(q) else q)
    bad = [i for i, q in enumerate(real) if not q.startswith(base)]
    if bad:
        shown = "\n  ".join(f"line {meta['line'].iat[i]}: {meta['id'].iat[i]!r} -> {real[i]}"
                            for i in bad[:5])
        raise ValueError(
            f"dataset {dataset!r}: {len(bad)} image(s) listed in {str(listing)!r} lie outside "
            f"the data root {str(root)!r}, e.g.\n  {shown}\nlist image paths relative to the data "
            "root, without '..' (a link inside it must point inside it too), or move the "
            "images into the data root")
    return real


def _check_listed_once(meta: pd.DataFrame, dataset: str, root: Path, listing: Path) -> None:
    """Every image file once, in one split: a repeat counts twice, and a file in two
    splits leaks between them. Compares real paths, so aliases of a file count."""
    dup = meta[meta["real"].duplicated(keep=False)]
    if len(dup):
        files = [d for _, d in dup.groupby("real", sort=False)]
        leaks = sum(d["split"].nunique() > 1 for d in files)
        shown = "\n  ".join(", ".join(f"line {n} {i!r} ({s})" for n, i, s in
                                      zip(d["line"], d["id"], d["split"])) for d in files[:5])
        raise ValueError(
            f"dataset {dataset!r} at {str(root)!r}: {len(files)} image file(s) are listed more "
            f"than once in {str(listing)!r}, {leaks} of them in more than one split, e.g.\n  "
            f"{shown}\na repeated image counts twice, and one in two splits leaks between them "
            "(the model is evaluated on images it trained on); list every image once, in a "
            "single split")


#: (real path, content hash) of images that decoded, in this process.
_DECODED: set = set()
_DECODE_BAR_FROM = 2000  # images to decode before a progress bar is worth showing


def _check_images_decode(meta: pd.DataFrame, dataset: str, root: Path, listing: Path) -> None:
    """Decode every image once now (JPEGs at 1/8 scale: cheap, yet every byte is read),
    so that a truncated or mislabelled file fails by name, not hours into training.
    Images that decoded are remembered by (path, hash of their bytes) in this process and
    in ``~/.cache/fairkd/decoded_images.json`` (never in the data root): a file whose
    content changed is decoded again, whatever its size and mtime say."""
    from PIL import Image
    from tqdm import tqdm

    keys = [(q, _content_hash(q)) for q in meta["real"]]
    if not _DECODED.issuperset(keys):
        stored = _read_decoded_cache()
        _DECODED.update(k for k in keys if stored.get(k[0]) == k[1])
    todo = [r for r in zip(meta["path"], meta["line"], keys) if r[2] not in _DECODED]
    bad = []
    for path, line, key in tqdm(todo, desc=f"checking {dataset} images", unit="image",
                                disable=len(todo) < _DECODE_BAR_FROM):
        try:
            with Image.open(key[0]) as im:
                im.draft("RGB", (1, 1))
                im.load()
            _DECODED.add(key)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
            bad.append(f"line {line}: {path} ({type(exc).__name__}: {exc})")
    if len(todo) > len(bad):
        _write_decoded_cache([k for _, _, k in todo if k in _DECODED])
    if bad:
        shown = "\n  ".join(bad[:5])
        raise ValueError(
            f"dataset {dataset!r} at {str(root)!r}: {len(bad)} of {len(keys)} listed images "
            f"cannot be decoded (truncated, or not an image), e.g.\n  {shown}\nre-download or "
            f"regenerate these files, or remove their rows from {str(listing)!r}")


def _content_hash(path) -> str:
    """A fast hash of the file's bytes (BLAKE2b, 128 bits): what the decoded-image check
    is keyed by."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _decoded_cache_path() -> Path:
    """``$FAIRKD_CACHE_DIR`` or ``~/.cache/fairkd`` (``$XDG_CACHE_HOME/fairkd``)."""
    base = os.environ.get("FAIRKD_CACHE_DIR") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fairkd"
    return Path(base) / "decoded_images.json"


def _read_decoded_cache() -> dict:
    try:
        stored = json.loads(_decoded_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _write_decoded_cache(keys) -> None:
    """Add decoded images to the cache file and drop those whose folder is gone; best
    effort, written atomically (a lost update only means decoding again)."""
    stored = _read_decoded_cache()
    stored.update(keys)
    isdir = functools.cache(os.path.isdir)  # each folder is checked once
    stored = {q: digest for q, digest in stored.items() if isdir(os.path.dirname(q))}
    path = _decoded_cache_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stored))
        os.replace(tmp, path)
    except OSError:
        pass


def _read_csv(path: Path, layout: str, what: str = "image", **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose errors name the file and say what to do (``what``: what one
    line of the file describes, for the message)."""
    try:
        return pd.read_csv(path, **kwargs)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                         f"save it with UTF-8 encoding\n{layout}") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{str(path)!r} is empty; it must hold a header line and one line per "
                         f"{what}\n{layout}") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"{str(path)!r} cannot be parsed ({str(exc).strip()}); every line needs "
                         f"the header's fields, quotes closed\n{layout}") from None


def _require_columns(df: pd.DataFrame, columns: Sequence[str], path: Path, layout: str):
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise ValueError(f"{str(path)!r} lacks column(s) {absent} (found "
                         f"{list(df.columns)[:12]}{' ...' if df.shape[1] > 12 else ''})\n{layout}")


def _require_file(path: Path, layout: str, what: str = "file") -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found\n{layout}")
    return path


def _parse_split(col: pd.Series, path: Path, layout: str) -> pd.Series:
    mapping = {"0": "train", "1": "val", "2": "test", "train": "train", "val": "val",
               "valid": "val", "validation": "val", "test": "test"}
    s = col.astype(str).str.strip().str.lower().map(mapping)
    if s.isna().any():
        bad = sorted(set(col[s.isna()].astype(str)))[:5]
        raise ValueError(f"{str(path)!r}: column 'split' has values {bad}; use train/val/test "
                         f"or 0/1/2\n{layout}")
    return s


def _int_column(df: pd.DataFrame, col: str, path: Path, layout: str) -> np.ndarray:
    v = pd.to_numeric(df[col], errors="coerce")
    if v.isna().any() or (v < 0).any() or (v != v.round()).any():
        bad = sorted(set(df[col][v.isna() | (v < 0) | (v != v.round())].astype(str)))[:5]
        raise ValueError(f"{str(path)!r}: column {col!r} must hold integers 0, 1, ...; "
                         f"found {bad}\n{layout}")
    return v.to_numpy().astype(np.int64)


def _read_metadata(root: Path, layout: str, what: str, columns: Sequence[str]):
    """``root/metadata.csv`` (``what`` names it in messages) and the id, path, split, y, a
    and line of each image it lists; ``columns`` are its required columns, in the order
    messages list them: the file name's first, the spurious attribute's last."""
    path = _require_file(root / "metadata.csv", layout, what)
    df = _read_csv(path, layout)
    _require_columns(df, columns, path, layout)
    files = df[columns[0]].astype(str)
    return path, pd.DataFrame({"id": files, "path": [str(root / f) for f in files],
                               "split": _parse_split(df["split"], path, layout),
                               "y": _int_column(df, "y", path, layout),
                               "a": _int_column(df, columns[-1], path, layout),
                               "line": np.arange(len(df)) + 2})


def _read_waterbirds(root: Path):
    if not (root / "metadata.csv").is_file() and \
            (root / "waterbird_complete95_forest2water2" / "metadata.csv").is_file():
        root = root / "waterbird_complete95_forest2water2"
    path, meta = _read_metadata(root, WATERBIRDS_LAYOUT, "Waterbirds metadata",
                                ["img_filename", "y", "split", "place"])
    for col, src in (("y", "y"), ("a", "place")):
        bad = sorted(set(meta[col]) - {0, 1})
        if bad:
            raise ValueError(f"{str(path)!r}: column {src!r} must be 0/1, found {bad[:5]}\n"
                             f"{WATERBIRDS_LAYOUT}")
    return meta, 2, 2, BIRD_GROUP_NAMES, path


def _read_celeba(root: Path):
    if not any((root / f"list_attr_celeba.{e}").is_file() for e in ("txt", "csv")) and \
            (root / "celeba").is_dir():
        root = root / "celeba"
    text = (root / "list_attr_celeba.txt").is_file()  # the original files, else Kaggle's .csv
    ext = "txt" if text else "csv"
    attr_path, part_path = root / f"list_attr_celeba.{ext}", root / f"list_eval_partition.{ext}"
    if text:
        # line 1: count; line 2: 40 names (one fewer field than the rows, so the
        # filename becomes the index); then rows `filename v1..v40`
        attrs = _read_csv(attr_path, CELEBA_LAYOUT, sep=r"\s+", skiprows=1)
        attrs.index = attrs.index.astype(str)
    elif attr_path.is_file():
        attrs = _read_csv(attr_path, CELEBA_LAYOUT, dtype={"image_id": str})
        _require_columns(attrs, ["image_id"], attr_path, CELEBA_LAYOUT)
        attrs = attrs.set_index("image_id")
    else:
        raise FileNotFoundError(f"CelebA attribute file {str(root / 'list_attr_celeba.txt')!r} "
                                f"(or .csv) not found\n{CELEBA_LAYOUT}")
    _require_file(part_path, CELEBA_LAYOUT, "CelebA partition file")
    columns = ["image_id", "partition"]  # the .txt file has no header line
    part = _read_csv(part_path, CELEBA_LAYOUT, dtype={"image_id": str},
                     **({"sep": r"\s+", "header": None, "names": columns} if text else {}))
    _require_columns(part, columns, part_path, CELEBA_LAYOUT)
    _require_columns(attrs, ["Blond_Hair", "Male"], attr_path, CELEBA_LAYOUT)
    part = part.set_index("image_id")
    if part.index.has_duplicates:
        twice = sorted(set(part.index[part.index.duplicated()]))
        raise ValueError(f"{str(part_path)!r} lists {len(twice)} image(s) more than once, e.g. "
                         f"{twice[:3]}; give every image one split\n{CELEBA_LAYOUT}")
    missing = attrs.index.difference(part.index)
    if len(missing):
        raise ValueError(f"{str(part_path)!r} has no split for {len(missing)} image(s) of "
                         f"{str(attr_path)!r}, e.g. {list(missing[:3])}\n{CELEBA_LAYOUT}")
    img_dir = root / "img_align_celeba"
    if (img_dir / "img_align_celeba").is_dir():  # Kaggle's nested folder
        img_dir = img_dir / "img_align_celeba"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"CelebA image folder {str(img_dir)!r} not found\n{CELEBA_LAYOUT}")
    y = pd.to_numeric(attrs["Blond_Hair"], errors="coerce")
    a = pd.to_numeric(attrs["Male"], errors="coerce")
    for name, v in (("Blond_Hair", y), ("Male", a)):
        if not v.isin([-1, 1, 0]).all():
            raise ValueError(f"{str(attr_path)!r}: column {name!r} must be -1/1\n{CELEBA_LAYOUT}")
    meta = pd.DataFrame({
        "id": attrs.index,
        "path": [str(img_dir / f) for f in attrs.index],
        "split": _parse_split(part.loc[attrs.index, "partition"].reset_index(drop=True),
                              part_path, CELEBA_LAYOUT).to_numpy(),
        "y": (y.to_numpy() > 0).astype(np.int64),
        "a": (a.to_numpy() > 0).astype(np.int64),
        "line": np.arange(len(attrs)) + (3 if text else 2),
    })
    return meta, 2, 2, CELEBA_GROUP_NAMES, attr_path


def _read_folder(root: Path):
    path, meta = _read_metadata(root, FOLDER_LAYOUT, "metadata file", ["filename", "split", "y", "a"])
    if len(meta) == 0:
        raise ValueError(f"{str(path)!r} lists no images\n{FOLDER_LAYOUT}")
    n_classes, n_attrs = int(meta["y"].max()) + 1, int(meta["a"].max()) + 1
    if n_classes < 2:
        raise ValueError(f"{str(path)!r}: column 'y' has a single class; need >= 2\n{FOLDER_LAYOUT}")
    names = [f"y={y}, a={a}" for y in range(n_classes) for a in range(n_attrs)]
    return meta, n_classes, n_attrs, names, path


_READERS = {"waterbirds": _read_waterbirds, "celeba": _read_celeba, "folder": _read_folder}
_LAYOUTS = {"waterbirds": WATERBIRDS_LAYOUT, "celeba": CELEBA_LAYOUT, "folder": FOLDER_LAYOUT}


# --------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    idx: torch.Tensor  # positions in the dataset (teacher logits are looked up by these)
    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor


def iterate_batches(ds: GroupDataset, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None, device="cpu",
                    num_workers: int = 0, pin_memory: bool = False,
                    drop_last: bool = False) -> Iterator[Batch]:
    """Batches of ``ds``: tensor slices for in-memory data, a DataLoader for lazy data.

    Order and augmentation are drawn from ``generator`` only, so a seeded generator
    gives the same batches on every run (and with any number of workers).
    """
    n = len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    starts = range(0, n - n % batch_size if drop_last else n, batch_size)
    if ds.in_memory:
        for start in starts:
            idx = order[start:start + batch_size]
            x = _augment_tensor(ds.x[idx], generator) if ds.augment else ds.x[idx]
            yield Batch(idx, x.to(device), ds.y[idx].to(device), ds.a[idx].to(device))
        return
    # lazy data: the loader reads ds[(i, seed)] in ``order``, one augmentation seed per item
    seeds = torch.randint(0, 2 ** 62, (n,), generator=generator).tolist() if ds.augment else [None] * n
    loader = DataLoader(ds, batch_size=batch_size, sampler=[(i, seeds[i]) for i in order.tolist()],
                        num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last)
    for start, (x, y, a) in zip(starts, loader):
        idx = order[start:start + batch_size]
        yield Batch(idx, x.to(device), y.long().to(device), a.long().to(device))


def _augment_tensor(x: torch.Tensor, generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts of up to ``pad`` px, for in-memory images."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (ox.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


# --------------------------------------------------------------------------- tables, display


def group_table(splits: dict[str, GroupDataset]) -> pd.DataFrame:
    """One row per (split, group): split, group, group_name, y, a, n — ``groups.csv``."""
    rows = [(split, grp, name, grp // ds.n_attrs, grp % ds.n_attrs, n)
            for split, ds in splits.items()
            for grp, (name, n) in enumerate(zip(ds.group_names, ds.group_counts().tolist()))]
    return pd.DataFrame(rows, columns=["split", "group", "group_name", "y", "a", "n"])


def to_display(x) -> np.ndarray:
    """Undo ImageNet normalisation: (3,H,W) -> HWC (or (N,3,H,W) -> NHWC) floats in [0, 1]."""
    x = torch.as_tensor(x).detach().cpu().float()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x * std + mean).clamp(0, 1)
    return img.movedim(-3, -1).numpy()
