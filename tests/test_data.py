"""The data layer: synthetic generator, local-folder loaders, batches, bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fairkd_utils import data as fkdata
from fairkd_utils import synthetic_images
from fairkd_utils.data import iterate_batches, load_splits
from fakes import make_fake_celeba, make_fake_folder, make_fake_waterbirds


# --------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def small_synth():
    return load_splits("synthetic", scale=0.05, seed=3)


def test_synthetic_has_waterbirds_group_counts_at_full_scale():
    for split, counts in synthetic_images.WATERBIRDS_COUNTS.items():
        assert synthetic_images.synthetic_counts(split, 1.0) == list(counts)
    splits = load_splits("synthetic", scale=1.0, seed=0)  # a few seconds
    for split, ds in splits.items():
        assert ds.group_counts().tolist() == list(synthetic_images.WATERBIRDS_COUNTS[split])
        assert ds.x.shape == (sum(synthetic_images.WATERBIRDS_COUNTS[split]), 3, 32, 32)


def test_synthetic_scaled_counts_are_rounded_and_keep_every_group(small_synth):
    for split, ds in small_synth.items():
        expected = [max(1, round(0.05 * c)) for c in synthetic_images.WATERBIRDS_COUNTS[split]]
        assert ds.group_counts().tolist() == expected
    tiny = load_splits("synthetic", scale=0.001)
    assert all((ds.group_counts() >= 1).all() for ds in tiny.values())


def test_synthetic_shapes_dtypes_and_value_range(small_synth):
    mean = torch.tensor(fkdata.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(fkdata.IMAGENET_STD).view(1, 3, 1, 1)
    for split, ds in small_synth.items():
        assert ds.x.dtype == torch.float32 and ds.y.dtype == ds.a.dtype == torch.long
        assert ds.x.shape[1:] == (3, 32, 32) and len(ds.x) == len(ds.y) == len(ds.ids)
        raw = ds.x * std + mean  # undone normalisation lies in [0, 1]
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
        assert torch.equal(ds.g, 2 * ds.y + ds.a)
        assert ds.group_names == ["landbird on land", "landbird on water",
                                  "waterbird on land", "waterbird on water"]
        x, y, a = ds[0]
        assert x.shape == (3, 32, 32) and isinstance(y, int) and isinstance(a, int)
    img = fkdata.to_display(small_synth["train"].x[:2])
    assert img.shape == (2, 32, 32, 3) and img.min() >= 0 and img.max() <= 1
    assert fkdata.to_display(small_synth["train"].x[0]).shape == (32, 32, 3)
    assert load_splits("synthetic", scale=0.02, image_size=48)["val"].x.shape[-1] == 48


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds(small_synth):
    again = load_splits("synthetic", scale=0.05, seed=3)
    other = load_splits("synthetic", scale=0.05, seed=4)
    for split in fkdata.SPLITS:
        assert torch.equal(small_synth[split].x, again[split].x)
        assert torch.equal(small_synth[split].y, again[split].y)
        assert not torch.equal(small_synth[split].x, other[split].x)
    # each split has its own sub-seed: val is not a copy of train's first images
    assert not torch.equal(small_synth["val"].x[:5], small_synth["train"].x[:5])


def test_synthetic_knobs_validate_and_change_the_train_correlation():
    s = load_splits("synthetic", scale=1.0, spurious_strength=0.8, image_size=8)
    c = s["train"].group_counts().tolist()
    assert c[0] / (c[0] + c[1]) == pytest.approx(0.8, abs=1e-3)
    assert s["test"].group_counts().tolist() == list(synthetic_images.WATERBIRDS_COUNTS["test"])
    with pytest.raises(ValueError, match="reliability"):
        load_splits("synthetic", scale=0.02, reliability=0.2)
    with pytest.raises(TypeError):
        load_splits("synthetic", scale=0.02, no_such_knob=1)


def _small_cnn(width=16):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
        torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.BatchNorm2d(2 * width),
        torch.nn.ReLU(),
        torch.nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(2 * width), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * width, 2))


def test_erm_on_synthetic_leaves_worst_group_far_below_train_weighted_average():
    """Property (a) of the calibration at a small scale (bench/ checks the full one)."""
    torch.manual_seed(0)
    splits = load_splits("synthetic", scale=0.3, seed=0)
    train, test = splits["train"], splits["test"]
    model = _small_cnn()
    epochs = 8
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for b in iterate_batches(train, 128, shuffle=True, generator=gen):
            loss = F.cross_entropy(model(b.x), b.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(test.x).argmax(1)
    acc = torch.bincount(test.g, (pred == test.y).double(), 4) / test.group_counts()
    prop = train.group_counts() / len(train)
    wga, tw = float(acc.min()), float((acc * prop).sum())
    assert tw - wga >= 0.2, f"group acc {acc.tolist()}: WGA {wga:.3f}, train-weighted {tw:.3f}"
    assert int(acc.argmin()) in (1, 2), "the worst group is a minority group"


# --------------------------------------------------------------------------- batches


def test_iterate_batches_slices_in_memory_data_deterministically(small_synth):
    ds = small_synth["train"]
    run = lambda: list(iterate_batches(ds, 16, shuffle=True,  # noqa: E731
                                       generator=torch.Generator().manual_seed(1)))
    b1, b2 = run(), run()
    assert all(torch.equal(p.idx, q.idx) for p, q in zip(b1, b2))
    idx = torch.cat([b.idx for b in b1])
    assert sorted(idx.tolist()) == list(range(len(ds)))
    b = b1[0]
    assert torch.equal(b.x, ds.x[b.idx]) and torch.equal(b.y, ds.y[b.idx])
    assert torch.equal(b.a, ds.a[b.idx])
    ordered = list(iterate_batches(ds, 16, shuffle=False, drop_last=True))
    assert all(len(b.idx) == 16 for b in ordered)
    assert torch.equal(ordered[0].idx, torch.arange(16))


def test_augmentation_only_on_train_and_reproducible():
    s = load_splits("synthetic", scale=0.02, augment=True)
    assert s["train"].augment and not s["val"].augment and not s["test"].augment
    run = lambda: next(iterate_batches(s["train"], 8, shuffle=False,  # noqa: E731
                                       generator=torch.Generator().manual_seed(0)))
    a, b = run(), run()
    assert torch.equal(a.x, b.x) and a.x.shape == (8, 3, 32, 32)
    assert not torch.equal(a.x, s["train"].x[:8])


def test_iterate_batches_decodes_lazy_data_deterministically_with_augmentation(tmp_path):
    make_fake_waterbirds(tmp_path)
    s = load_splits("waterbirds", tmp_path, image_size=16, augment=True)
    run = lambda: list(iterate_batches(s["train"], 4, shuffle=True,  # noqa: E731
                                       generator=torch.Generator().manual_seed(5)))
    b1, b2 = run(), run()
    assert sum(len(b.idx) for b in b1) == len(s["train"])
    for p, q in zip(b1, b2):
        assert torch.equal(p.idx, q.idx) and torch.equal(p.x, q.x)
        assert torch.equal(p.y, s["train"].y[p.idx])
    assert b1[0].x.shape == (4, 3, 16, 16) and b1[0].x.dtype == torch.float32


# --------------------------------------------------------------------------- local folders


def _check_counts(splits, counts):
    for split, cs in counts.items():
        assert splits[split].group_counts().tolist() == list(cs)


def test_waterbirds_loader_maps_place_to_attribute_and_filters_splits(tmp_path):
    counts = make_fake_waterbirds(tmp_path)
    s = load_splits("waterbirds", tmp_path, image_size=16)
    _check_counts(s, counts)
    meta = pd.read_csv(tmp_path / "metadata.csv")
    train_meta = meta[meta["split"] == 0]
    assert s["train"].ids == train_meta["img_filename"].tolist()
    assert s["train"].y.tolist() == train_meta["y"].tolist()
    assert s["train"].a.tolist() == train_meta["place"].tolist()
    assert s["train"].group_names[2] == "waterbird on land"
    x, y, a = s["test"][0]  # grayscale JPEGs come out as 3 channels
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    # a parent folder holding waterbird_complete95_forest2water2/ works too
    parent = tmp_path / "parent"
    make_fake_waterbirds(parent / "waterbird_complete95_forest2water2")
    _check_counts(load_splits("waterbirds", parent), counts)


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_celeba_loader_reads_blond_hair_and_male_from_txt_or_csv(tmp_path, fmt):
    counts = make_fake_celeba(tmp_path, fmt=fmt)
    s = load_splits("celeba", tmp_path, image_size=8)
    _check_counts(s, counts)
    assert s["train"].group_names == ["non-blond woman", "non-blond man",
                                      "blond woman", "blond man"]
    assert s["val"].ids[0].endswith(".jpg")
    for split in fkdata.SPLITS:  # every image decodes, grayscale ones included
        for i in range(len(s[split])):
            assert s[split][i][0].shape == (3, 8, 8)


def test_folder_loader_accepts_split_names_or_codes(tmp_path):
    for names in (True, False):
        root = tmp_path / str(names)
        counts = make_fake_folder(root, split_names=names)
        s = load_splits("folder", root, image_size=8)
        _check_counts(s, counts)
        assert s["train"].n_classes == 2 and s["train"].n_attrs == 2
        assert s["train"].group_names[3] == "y=1, a=1"


def test_folder_loader_takes_class_and_attribute_counts_from_the_data(tmp_path):
    lines = ["filename,split,y,a"]
    i = 0
    for split in ("train", "val", "test"):
        for y in range(3):
            for a in range(2):
                fn = f"im{i}.jpg"
                from fakes import write_jpeg
                write_jpeg(tmp_path / fn, i)
                lines.append(f"{fn},{split},{y},{a}")
                i += 1
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    s = load_splits("folder", tmp_path)
    assert (s["test"].n_classes, s["test"].n_attrs, s["test"].n_groups) == (3, 2, 6)
    assert s["test"].group_counts().tolist() == [1] * 6


def test_real_data_scale_subsamples_every_group(tmp_path):
    counts = {"train": (40, 10, 4, 20), "val": (4, 4, 2, 2), "test": (4, 4, 2, 2)}
    make_fake_folder(tmp_path, counts=counts)
    s = load_splits("folder", tmp_path, scale=0.5, seed=1)
    assert s["train"].group_counts().tolist() == [20, 5, 2, 10]
    assert s["val"].group_counts().tolist() == [2, 2, 1, 1]
    again = load_splits("folder", tmp_path, scale=0.5, seed=1)
    assert s["train"].ids == again["train"].ids


def test_group_table_lists_every_split_and_group(small_synth):
    t = fkdata.group_table(small_synth)
    assert list(t.columns) == ["split", "group", "group_name", "y", "a", "n"]
    assert len(t) == 12
    row = t[(t.split == "train") & (t.group == 2)].iloc[0]
    assert (row.group_name, row.y, row.a) == ("waterbird on land", 1, 0)
    assert row.n == small_synth["train"].group_counts()[2]


# --------------------------------------------------------------------------- bad input


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'birds'.*synthetic.*waterbirds"):
        load_splits("birds")


def test_missing_data_root_names_the_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*metadata\.csv"):
        load_splits("waterbirds", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="root="):
        load_splits("celeba")
    with pytest.raises(FileNotFoundError, match="list_attr_celeba"):
        load_splits("celeba", tmp_path)  # root exists, files do not


def test_metadata_without_a_needed_column_names_it(tmp_path):
    make_fake_waterbirds(tmp_path)
    meta = pd.read_csv(tmp_path / "metadata.csv").drop(columns=["place"])
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=r"metadata\.csv.*\['place'\].*img_filename"):
        load_splits("waterbirds", tmp_path)

    folder = tmp_path / "f"
    make_fake_folder(folder)
    meta = pd.read_csv(folder / "metadata.csv").rename(columns={"a": "attr"})
    meta.to_csv(folder / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=r"(?s)\['a'\].*filename, split, y, a"):
        load_splits("folder", folder)


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_celeba_attribute_file_without_male_names_the_column(tmp_path, fmt):
    make_fake_celeba(tmp_path, fmt=fmt)
    path = tmp_path / f"list_attr_celeba.{fmt}"
    path.write_text(path.read_text().replace("Male", "Mole"))
    with pytest.raises(ValueError, match=r"list_attr_celeba.*\['Male'\]"):
        load_splits("celeba", tmp_path)


def test_listed_but_absent_images_are_reported_when_opened(tmp_path):
    make_fake_waterbirds(tmp_path)
    meta = pd.read_csv(tmp_path / "metadata.csv")
    for fn in meta["img_filename"][:3]:
        (tmp_path / fn).unlink()
    with pytest.raises(FileNotFoundError, match=r"3 of \d+ listed images are missing") as e:
        load_splits("waterbirds", tmp_path)
    assert meta["img_filename"][0].split("/")[-1] in str(e.value)


def test_split_with_an_empty_group_is_an_error(tmp_path):
    counts = {"train": (3, 2, 0, 2), "val": (1, 1, 1, 1), "test": (1, 1, 1, 1)}
    make_fake_folder(tmp_path, counts=counts)
    with pytest.raises(ValueError, match=r"split 'train' has empty group.*y=1, a=0"):
        load_splits("folder", tmp_path)
    empty_split = tmp_path / "e"
    make_fake_folder(empty_split, counts={"train": (1, 1, 1, 1), "val": (0, 0, 0, 0),
                                          "test": (1, 1, 1, 1)})
    with pytest.raises(ValueError, match="split 'val' has no instances"):
        load_splits("folder", empty_split)


def test_bad_values_and_misplaced_knobs_are_clear_errors(tmp_path):
    make_fake_folder(tmp_path)
    meta = pd.read_csv(tmp_path / "metadata.csv")
    meta.loc[0, "split"] = "training"
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(ValueError, match="'split' has values.*training"):
        load_splits("folder", tmp_path)
    with pytest.raises(ValueError, match="only apply to the synthetic"):
        load_splits("folder", tmp_path, reliability=0.9)


def test_the_object_is_100_percent_predictive_by_default_and_reliability_swaps_it():
    splits = load_splits("synthetic", scale=0.2, seed=1, image_size=8)
    for ds in splits.values():
        assert torch.equal(ds.object_class, ds.y)          # the bird is always the label's
    noisy = load_splits("synthetic", scale=0.5, seed=1, image_size=8, reliability=0.8)["train"]
    assert (noisy.object_class == noisy.y).double().mean() == pytest.approx(0.8, abs=0.03)


def test_the_shape_colour_carries_no_class_cue_unless_asked():
    """With colour_cue=0 the object's mean brightness is the same for both classes; at 1
    landbirds are dark and waterbirds light (a cue a pooled early feature reads)."""
    def shape_brightness(colour_cue):
        x, drawn = synthetic_images._render_birds(torch.arange(4000) % 2, torch.zeros(4000, dtype=torch.long), 32,
                                        torch.Generator().manual_seed(0), colour_cue=colour_cue,
                                        noise=0.0, background_contrast=0.0)
        raw = x * torch.tensor(fkdata.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(fkdata.IMAGENET_MEAN).view(1, 3, 1, 1)
        mean = raw.mean(dim=(1, 2, 3))
        return float(mean[drawn == 0].mean()), float(mean[drawn == 1].mean())
    land, water = shape_brightness(0.0)
    assert abs(land - water) < 0.005
    land, water = shape_brightness(1.0)
    assert water - land > 0.03
    with pytest.raises(ValueError, match="colour_cue"):
        load_splits("synthetic", scale=0.02, colour_cue=1.5)


@pytest.mark.parametrize("alignment", [0.5, 0.8])
def test_the_pretraining_corpus_alignment_is_what_its_knob_says(alignment):
    corpus = synthetic_images.make_pretraining_corpus(n_per_pair=100, alignment=alignment, image_size=8, seed=2)
    n = sum(ds.group_counts() for ds in corpus.values())
    assert int(n.sum()) == 400 and n[0] + n[1] == n[2] + n[3] == 200   # classes balanced
    own = float((n[0] + n[3]).double() / n.sum())                        # a == y
    assert own == pytest.approx(alignment, abs=1e-9)
    assert torch.equal(corpus["train"].object_class, corpus["train"].y)
    assert 0 < len(corpus["val"]) < len(corpus["train"])
    with pytest.raises(ValueError, match="alignment"):
        synthetic_images.make_pretraining_corpus(n_per_pair=10, alignment=1.2)
