"""Trustworthy local data: what a folder must satisfy before a run trusts it (files
inside the root, each listed once, readable metadata, decodable images), the
fingerprint of lazy data, and the minority groups of balanced data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import jupytext
import numpy as np
import pandas as pd
import pytest
import torch

from fairkd_utils import data as fkdata
from fairkd_utils import synthetic_images
from fairkd_utils import metrics, rundir
from fairkd_utils.data import load_splits
from fairkd_utils.profiles import get_profile
from fairkd_utils.checkpoints import describe_data, fingerprint
from fakes import make_fake_celeba, make_fake_folder, make_fake_waterbirds, write_jpeg

ODD_COUNTS = {"train": (7, 3, 1, 5), "val": (3, 1, 1, 2), "test": (1, 3, 2, 1)}


@pytest.fixture(autouse=True)
def decode_cache(tmp_path, monkeypatch):
    """A fresh cache of decoded images per test: in memory and in a private folder."""
    monkeypatch.setenv("FAIRKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fkdata, "_DECODED", set())
    return tmp_path / "cache" / "decoded_images.json"


def _append_rows(root: Path, *rows: str) -> int:
    """Add metadata rows; returns the line number of the first one added."""
    path = root / "metadata.csv"
    text = path.read_text()
    path.write_text(text + "".join(r + "\n" for r in rows))
    return text.count("\n") + 1


def _line_of(root: Path, filename: str) -> int:
    return next(i for i, line in enumerate((root / "metadata.csv").read_text().splitlines(), 1)
                if line.startswith(filename + ",") or f",{filename}," in line)


# --------------------------------------------------------------------------- 2: fingerprint


def test_lazy_fingerprint_follows_each_files_size_and_mtime(tmp_path):
    root = tmp_path / "data"
    make_fake_folder(root, counts=ODD_COUNTS)
    train = load_splits("folder", root)["train"]
    before = fingerprint(describe_data(train))
    assert fingerprint(describe_data(load_splits("folder", root)["train"])) == before
    write_jpeg(Path(train.paths[3]), seed=999, size=16)  # regenerated, same name
    assert fingerprint(describe_data(train)) != before
    again = fingerprint(describe_data(train))
    st = os.stat(train.paths[0])
    os.utime(train.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # touched only
    assert fingerprint(describe_data(train)) != again


def test_in_memory_fingerprint_is_what_it_was():
    """A pinned value (every value of ``x`` hashed, as since the data fingerprint stopped
    sampling rows): no file facts for data held in memory; a format change shows here."""
    y, a = torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    x = torch.linspace(-1, 1, 6 * 3 * 4 * 4).view(6, 3, 4, 4)
    ds = fkdata.GroupDataset("synthetic", "train", y, a, n_classes=2, n_attrs=2,
                             group_names=fkdata.BIRD_GROUP_NAMES,
                             ids=[f"i{k}" for k in range(6)], x=x, image_size=4)
    assert "files" not in describe_data(ds)
    assert fingerprint(describe_data(ds)) == "83c2491673efb041"


# --------------------------------------------------------------------------- 3: each file once


def test_an_image_in_two_splits_is_refused_naming_its_lines(tmp_path):
    make_fake_folder(tmp_path, counts=ODD_COUNTS, shuffle_seed=4)
    meta = pd.read_csv(tmp_path / "metadata.csv")
    fn = meta[meta.split == "train"].filename.iloc[0]
    first = _line_of(tmp_path, fn)
    added = _append_rows(tmp_path, f"{fn},test,0,0")
    with pytest.raises(ValueError, match="listed more than once") as e:
        load_splits("folder", tmp_path)
    msg = str(e.value)
    assert f"line {first} {fn!r} (train), line {added} {fn!r} (test)" in msg
    assert "1 of them in more than one split" in msg and "list every image once" in msg
    assert "metadata.csv" in msg


def test_an_image_listed_twice_in_one_split_or_under_an_alias_is_refused(tmp_path):
    make_fake_waterbirds(tmp_path, counts=ODD_COUNTS, shuffle_seed=1)
    meta = pd.read_csv(tmp_path / "metadata.csv")
    row = meta.iloc[5]
    folder, name = row.img_filename.split("/")
    _append_rows(tmp_path, f"999,{folder}/./{name},{row.y},{row.split},{row.place},x")
    with pytest.raises(ValueError, match=r"(?s)1 image file\(s\) are listed more than once.*"
                                         r"0 of them in more than one split") as e:
        load_splits("waterbirds", tmp_path)
    assert f"'{folder}/./{name}'" in str(e.value) and f"'{row.img_filename}'" in str(e.value)


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_celeba_image_listed_twice_is_refused(tmp_path, fmt):
    make_fake_celeba(tmp_path, fmt=fmt)
    part = tmp_path / f"list_eval_partition.{fmt}"
    sep = "," if fmt == "csv" else " "
    part.write_text(part.read_text() + f"000001.jpg{sep}2\n")
    with pytest.raises(ValueError, match=r"list_eval_partition.*more than once.*000001\.jpg"):
        load_splits("celeba", tmp_path)
    make_fake_celeba(tmp_path / "again", fmt=fmt)
    attr = tmp_path / "again" / f"list_attr_celeba.{fmt}"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join(lines + [lines[-1]]) + "\n")
    with pytest.raises(ValueError, match=r"listed more than once in .*list_attr_celeba") as e:
        load_splits("celeba", tmp_path / "again")
    assert f"line {len(lines)} " in str(e.value) and f"line {len(lines) + 1} " in str(e.value)


# --------------------------------------------------------------------------- 5: inside the root


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_an_image_outside_the_data_root_is_refused_naming_its_line(tmp_path, kind):
    root = tmp_path / "a" / "data"
    make_fake_folder(root, counts=ODD_COUNTS)
    write_jpeg(tmp_path / "outside.jpg", seed=5)
    listed = "../../outside.jpg" if kind == "relative" else str(tmp_path / "outside.jpg")
    line = _append_rows(root, f"{listed},train,0,0")
    with pytest.raises(ValueError, match="outside the data root") as e:
        load_splits("folder", root)
    assert f"line {line}: {listed!r}" in str(e.value)
    assert "relative to the data root" in str(e.value)


def test_a_symlinked_root_loads_but_a_link_out_of_the_root_does_not(tmp_path):
    real = tmp_path / "real"
    counts = make_fake_folder(real, counts=ODD_COUNTS)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    s = load_splits("folder", tmp_path / "link")
    assert s["train"].group_counts().tolist() == list(counts["train"])
    (real / "more").symlink_to(real / "images", target_is_directory=True)  # inside: fine
    meta = pd.read_csv(real / "metadata.csv")
    meta["filename"] = meta.filename.str.replace("images/", "more/")
    meta.to_csv(real / "metadata.csv", index=False)
    assert len(load_splits("folder", tmp_path / "link")["test"]) == sum(counts["test"])
    write_jpeg(tmp_path / "elsewhere.jpg", seed=1)
    target = real / "images" / "img_0002.jpg"
    target.unlink()
    target.symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(ValueError, match=r"(?s)outside the data root.*"
                                         r"line \d+: 'more/img_0002\.jpg' -> .*elsewhere"):
        load_splits("folder", tmp_path / "link")


# --------------------------------------------------------------------------- 9: metadata parsing


def test_metadata_that_is_not_utf8_names_the_file(tmp_path):
    make_fake_folder(tmp_path)
    path = tmp_path / "metadata.csv"
    path.write_bytes(path.read_bytes().replace(b"img_0001", "imgé0001".encode("latin-1")))
    with pytest.raises(ValueError, match=r"metadata\.csv' is not UTF-8 text \(byte 0xe9\).*"
                                         r"save it with UTF-8"):
        load_splits("folder", tmp_path)


@pytest.mark.parametrize("dataset", ["folder", "waterbirds"])
def test_an_empty_metadata_file_names_the_file(tmp_path, dataset):
    {"folder": make_fake_folder, "waterbirds": make_fake_waterbirds}[dataset](tmp_path)
    (tmp_path / "metadata.csv").write_text("")
    with pytest.raises(ValueError, match=r"(?s)metadata\.csv' is empty.*expected layout"):
        load_splits(dataset, tmp_path)


def test_an_unparsable_metadata_file_names_the_file_and_line(tmp_path):
    make_fake_folder(tmp_path)
    line = _append_rows(tmp_path, "images/img_0000.jpg,train,0,0,extra,fields")
    with pytest.raises(ValueError, match=rf"metadata\.csv' cannot be parsed \(.*line {line}.*\)"):
        load_splits("folder", tmp_path)
    make_fake_celeba(tmp_path / "c", fmt="txt")
    part = tmp_path / "c" / "list_eval_partition.txt"
    part.write_text(part.read_text() + "000002.jpg 1 extra\n")
    with pytest.raises(ValueError, match=r"list_eval_partition\.txt' cannot be parsed"):
        load_splits("celeba", tmp_path / "c")


# --------------------------------------------------------------------------- 10: images decode


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_an_image_that_does_not_decode_fails_when_opened_naming_it(tmp_path, damage):
    make_fake_waterbirds(tmp_path, counts=ODD_COUNTS, shuffle_seed=2)
    meta = pd.read_csv(tmp_path / "metadata.csv")
    fn = meta.img_filename.iloc[4]
    if damage == "truncated":
        _truncate(tmp_path / fn)
    else:
        (tmp_path / fn).write_text("not an image\n")
    with pytest.raises(ValueError, match=r"1 of \d+ listed images cannot be decoded") as e:
        load_splits("waterbirds", tmp_path)
    assert f"line {_line_of(tmp_path, fn)}: {tmp_path / fn}" in str(e.value)
    assert "remove their rows" in str(e.value)


def test_only_the_images_kept_by_scale_are_decoded(tmp_path):
    counts = {"train": (20, 4, 2, 10), "val": (2, 2, 2, 2), "test": (2, 2, 2, 2)}
    make_fake_folder(tmp_path, counts=counts)
    kept = set(p for ds in load_splits("folder", tmp_path, scale=0.5).values() for p in ds.paths)
    dropped = sorted(set(str(tmp_path / f) for f in pd.read_csv(tmp_path / "metadata.csv").filename)
                     - kept)
    _truncate(Path(dropped[0]))
    assert len(load_splits("folder", tmp_path, scale=0.5)["train"]) == 18
    with pytest.raises(ValueError, match="cannot be decoded"):
        load_splits("folder", tmp_path)


def test_decoded_images_are_remembered_by_content_outside_the_data_root(
        tmp_path, decode_cache, monkeypatch):
    root = tmp_path / "data"
    make_fake_folder(root, counts=ODD_COUNTS)
    before = sorted(p for p in root.rglob("*"))
    s = load_splits("folder", root)
    assert sorted(p for p in root.rglob("*")) == before  # nothing written into the data root
    stored = json.loads(decode_cache.read_text())
    assert len(stored) == sum(len(ds) for ds in s.values())
    # a new process (empty memory) trusts the cache file and decodes nothing
    monkeypatch.setattr(fkdata, "_DECODED", set())
    import PIL.Image
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open",
                        lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    load_splits("folder", root)
    assert opened == []
    # a file whose content changed since is decoded again, and fails by name
    _truncate(Path(s["val"].paths[1]))
    with pytest.raises(ValueError, match=rf"(?s)cannot be decoded.*{s['val'].paths[1]}"):
        load_splits("folder", root)
    assert opened == [os.path.realpath(s["val"].paths[1])]


def test_decoding_many_images_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
    make_fake_folder(tmp_path)
    monkeypatch.setattr(fkdata, "_DECODE_BAR_FROM", 5)
    load_splits("folder", tmp_path)
    assert "checking folder images" in capsys.readouterr().err
    monkeypatch.setattr(fkdata, "_DECODED", set())
    monkeypatch.setattr(fkdata, "_DECODE_BAR_FROM", 2000)
    monkeypatch.setenv("FAIRKD_CACHE_DIR", str(tmp_path / "other_cache"))
    load_splits("folder", tmp_path)
    assert "checking folder images" not in capsys.readouterr().err


# --------------------------------------------------------------------------- 11: balanced data


def test_minority_groups_of_balanced_data_are_the_smallest_or_none():
    assert metrics.minority_groups([3498, 184, 56, 1057], 2) == [1, 2]  # unchanged
    assert metrics.minority_groups([10, 10, 9, 10], 2) == [2]
    assert metrics.minority_groups([9, 10, 9, 12, 11, 10], 2) == [0, 2]
    assert metrics.minority_groups([5, 5, 5, 5], 2) == []


def _premise_cells():
    repo = Path(__file__).resolve().parents[1]
    nb = jupytext.read(repo / "notebooks" / "03_early_exit_student.py")
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    start = next(i for i, src in enumerate(code) if "def exit_premise" in src)
    return code[start:start + 2]


@pytest.mark.parametrize("counts", [[10, 10, 9, 10], [5, 5, 5, 5]])
def test_notebook_03_premise_check_handles_balanced_training_data(counts, capsys):
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(4), counts)
    frame = pd.DataFrame({"group": g, "group_name": [f"g{k}" for k in g],
                          "prob": rng.uniform(0.5, 1, len(g)), "margin": rng.uniform(0, 1, len(g)),
                          "correct": rng.random(len(g)) < 0.7})
    train = SimpleNamespace(group_counts=lambda: torch.tensor(counts),
                            group_names=["g0", "g1", "g2", "g3"])
    namespace = {"pd": pd, "np": np, "frame": frame, "train_preds": {0: frame},
                 "splits": {"train": train},
                 "minority": metrics.minority_groups(counts, 2),
                 "fk": SimpleNamespace(students=SimpleNamespace(exit_frame=lambda p, ds: p))}
    for source in _premise_cells():
        exec(source, namespace)
    out = capsys.readouterr().out
    if len(set(counts)) == 1:
        assert "no group is a minority: the premise check is skipped" in out
    else:
        assert "the smallest ['g2'] stand in for the minority" in out
        assert "On the minority groups the exit is wrong on" in out


def test_data_scale_applies_to_synthetic_data_only(tmp_path):
    smoke = get_profile("smoke")
    assert smoke.data_scale < 0.5
    make_fake_folder(tmp_path / "data", counts=ODD_COUNTS)
    run = rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=smoke, dataset="folder",
                         data_root=str(tmp_path / "data"), seeds=[0], device="cpu")
    for split, counts in ODD_COUNTS.items():
        assert run.splits()[split].group_counts().tolist() == list(counts)
    synth = rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=smoke,
                           dataset="synthetic", data_root=None, seeds=[0], device="cpu")
    assert synth.splits()["train"].group_counts().tolist() == \
        synthetic_images.synthetic_counts("train", smoke.data_scale)


def test_an_image_corrupted_with_the_same_size_and_mtime_is_decoded_again(tmp_path, decode_cache,
                                                                         monkeypatch):
    """The check is keyed by content: restoring a file's size and mtime does not fool it."""
    root = tmp_path / "data"
    make_fake_folder(root, counts=ODD_COUNTS)
    s = load_splits("folder", root)
    victim = Path(s["val"].paths[1])
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)                        # not an image any more
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(ValueError, match=rf"(?s)cannot be decoded.*{victim}"):
        load_splits("folder", root)                                # same process
    monkeypatch.setattr(fkdata, "_DECODED", set())
    with pytest.raises(ValueError, match=rf"(?s)cannot be decoded.*{victim}"):
        load_splits("folder", root)                                # a new one, reading the cache file
