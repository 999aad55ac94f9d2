"""The text path's reliability on a fake MultiNLI folder: the data fingerprint covers
every token, copies that differ in case or spacing are caught, over-long lines and
fields are refused in every layout, every text profile builds its models on MultiNLI
(smoke also end to end through papermill), and the runner checks both model folders
before any kernel starts."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import pandas as pd
import pytest
import torch

from fairkd_utils import (build, checkpoints, data, multinli, pipeline, rundir, synthetic_text, text_models)
from fairkd_utils.profiles import TEXT_PROFILES

from fakes import (TEXT_COUNTS, fake_multinli_rows, make_fake_bert_folder, make_fake_multinli,
                   make_fake_tokenizer_folder, write_multinli_table)

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)
MAX = multinli.MAX_TEXT_CHARS


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return text_models.load_tokenizer(make_fake_tokenizer_folder(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT folder (2 layers, 130 positions) with the fake tokenizer."""
    return make_fake_bert_folder(tmp_path_factory.mktemp("bert") / "bert")


def _fp(ds) -> str:
    return checkpoints.fingerprint(checkpoints.describe_data(ds))


# --------------------------------------------------------------------------- 1: fingerprint


def test_data_fingerprint_changes_with_any_one_token_of_a_multinli_premise(tmp_path, tokenizer):
    """One training premise replaced by another of the same length: the old fingerprint
    hashed only every len/64-th row, so an unsampled row reused the old checkpoint."""
    counts = {s: tuple(5 * c for c in cs) for s, cs in TEXT_COUNTS.items()}   # 170 train pairs
    df = fake_multinli_rows(counts)
    before = multinli.read_multinli(write_multinli_table(tmp_path / "a", df), tokenizer)["train"]
    assert len(before) // 64 >= 2                       # rows the old sample skipped exist
    for row in (1, len(before) - 2):
        pid = before.ids[row]
        edited = df.copy()
        k = edited.index[edited["pairID"] == pid][0]
        old = edited.at[k, "premise"]
        edited.at[k, "premise"] = old[:-1] + ("7" if old[-1] != "7" else "8")   # same length
        after = multinli.read_multinli(write_multinli_table(tmp_path / f"b{row}", edited),
                                       tokenizer)["train"]
        assert after.x.shape == before.x.shape and (after.x != before.x).sum() == 1
        assert _fp(after) != _fp(before)


def test_data_fingerprint_covers_every_value_of_in_memory_text_and_images():
    ds = synthetic_text.make_synthetic_text(scale=0.05, seed=0)["train"]
    base = _fp(ds)
    for row in range(len(ds)):                          # every row, not a sample
        x = ds.x.clone()
        x[row, 0, 1] = x[row, 0, 1] ^ 1                 # a word into its antonym
        twin = data.GroupDataset(ds.name, ds.split, ds.y, ds.a, n_classes=3, n_attrs=2,
                                 group_names=ds.group_names, ids=ds.ids, x=x)
        assert _fp(twin) != base, row
    imgs = torch.zeros(300, 3, 4, 4)
    y = torch.arange(300) % 2
    make = lambda x: data.GroupDataset("synthetic", "train", y, y, n_classes=2, n_attrs=2,  # noqa: E731
                                       group_names=data.BIRD_GROUP_NAMES,
                                       ids=[str(i) for i in range(300)], x=x, image_size=4)
    edited = imgs.clone()
    edited[151, 2, 3, 3] = 1.0                          # one pixel of an unsampled row
    assert _fp(make(edited)) != _fp(make(imgs))
    assert _fp(make(imgs.clone())) == _fp(make(imgs))   # content, not identity


# --------------------------------------------------------------------------- 4: copies


def test_copies_differing_in_case_and_spacing_are_caught_within_and_across_splits(tmp_path, tokenizer):
    df = fake_multinli_rows()
    i = df.index[df["split"].astype(str).isin(["test", "2"])][0]
    j = df.index[df["split"].astype(str).isin(["train", "0"])][0]
    leak = df.copy()
    leak.loc[i, "premise"] = "  " + df.at[j, "premise"].upper().replace(" ", "   ") + " "
    leak.loc[i, "hypothesis"] = df.at[j, "hypothesis"].title().replace(" ", "\t")
    assert leak.at[i, "premise"].strip() != df.at[j, "premise"]      # not equal as strings
    with pytest.raises(ValueError, match=r"more than one split \(compared as the tokenizer reads"):
        multinli.read_multinli(write_multinli_table(tmp_path / "leak", leak), tokenizer)
    kept = multinli.read_multinli(tmp_path / "leak", tokenizer, duplicates="drop")
    assert len(kept["test"]) == sum(TEXT_COUNTS["test"]) - 1         # the copy in test goes
    assert df.at[j, "pairID"] in kept["train"].ids
    twice = pd.concat([df, df.iloc[[j]].assign(premise=df.at[j, "premise"].capitalize() + "  ")],
                      ignore_index=True)
    with pytest.raises(ValueError, match="more than once within a split"):
        multinli.read_multinli(write_multinli_table(tmp_path / "twice", twice), tokenizer)
    # a real difference is no copy: one word changed
    other = df.copy()
    other.loc[i, ["premise", "hypothesis"]] = [df.at[j, "premise"] + " here", df.at[j, "hypothesis"]]
    assert len(multinli.read_multinli(write_multinli_table(tmp_path / "ok", other), tokenizer)["test"]) \
        == sum(TEXT_COUNTS["test"])


# --------------------------------------------------------------------------- 8, 9: bounded input


def _group_dro_folder(root, fmt="jsonl"):
    """Layout (b): the three MultiNLI 1.0 files (jsonl or txt) and metadata_random.csv."""
    df = fake_multinli_rows()
    files = ("multinli_1.0_train", "multinli_1.0_dev_matched", "multinli_1.0_dev_mismatched")
    parts = [df.iloc[k::3] for k in range(3)]
    (root / "multinli_1.0").mkdir(parents=True)
    meta, row = [], 0
    for name, part in zip(files, parts):
        recs = [{"gold_label": r.gold_label.lower(), "sentence1": r.premise, "sentence2": r.hypothesis,
                 "pairID": r.pairID} for r in part.itertuples()]
        path = root / "multinli_1.0" / f"{name}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        else:
            path.write_text("gold_label\tsentence1\tsentence2\tpairID\n" + "".join(
                f"{r['gold_label']}\t{r['sentence1']}\t{r['sentence2']}\t{r['pairID']}\n" for r in recs))
        for r in part.itertuples():
            split = {"0": "train", "1": "val", "2": "test"}.get(str(r.split), str(r.split))
            meta.append({"row": row, "gold_label": r.y, "sentence2_has_negation": r.a,
                         "split": ["train", "val", "test"].index(split)})
            row += 1
    pd.DataFrame(meta).set_index("row").rename_axis(None).to_csv(root / "metadata_random.csv")
    return root


def _lengthen(path, line_no, extra, where="after"):
    """Make line ``line_no`` (1-based) of ``path`` ``extra`` characters longer (inside its
    first text field for the readers that would parse it)."""
    lines = path.read_text().split("\n")
    filler = "a" * extra
    line = lines[line_no - 1]
    if path.suffix == ".jsonl":
        rec = json.loads(line)
        rec["sentence1"] += " " + filler
        lines[line_no - 1] = json.dumps(rec)
    elif path.suffix == ".txt":
        f = line.split("\t")
        f[1] += " " + filler
        lines[line_no - 1] = "\t".join(f)
    else:
        lines[line_no - 1] = line + filler if where == "after" else filler + line
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("layout", ["csv", "tsv", "jsonl", "txt", "metadata"])
def test_a_line_over_the_limit_is_refused_naming_the_file_and_line(tmp_path, tokenizer, layout):
    root = tmp_path / layout
    if layout in ("csv", "tsv"):
        write_multinli_table(root, fake_multinli_rows(), f"multinli.{layout}")
        path = root / f"multinli.{layout}"
    else:
        _group_dro_folder(root, "txt" if layout == "txt" else "jsonl")
        path = (root / "metadata_random.csv" if layout == "metadata"
                else root / "multinli_1.0" / f"multinli_1.0_dev_matched.{layout}")
    assert len(multinli.read_multinli(root, tokenizer)["train"]) == sum(TEXT_COUNTS["train"])
    # the group_DRO .txt: a field over csv's own limit (131,072) used to raise _csv.Error
    _lengthen(path, 3, 140_000 if layout == "txt" else MAX + 1)
    with pytest.raises(ValueError, match=rf"{path.name}' line 3 is longer than 100,000 characters"):
        multinli.read_multinli(root, tokenizer)


def test_the_limit_is_exact_and_a_huge_line_is_never_read_whole(tmp_path, tokenizer):
    import io

    ok = "x" * MAX
    assert list(multinli._bounded_lines(io.StringIO(ok + "\r\n" + ok), "f")) == [ok + "\r\n", ok]
    with pytest.raises(ValueError, match="'f' line 2 is longer"):
        list(multinli._bounded_lines(io.StringIO("a\n" + ok + "x\n"), "f"))
    root = write_multinli_table(tmp_path / "huge", fake_multinli_rows())
    _lengthen(root / "multinli.csv", 5, 10_000_000)                 # a 10 MB line
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="multinli.csv' line 5 is longer"):
            multinli.read_multinli(root, tokenizer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000                             # never the 10 MB line (x4 bytes/char)


def test_a_quoted_field_over_the_limit_is_refused(tmp_path, tokenizer):
    df = fake_multinli_rows()
    long = " ".join(["the cat"] * 13_000)               # lines of 70 chars, one field of 100k+
    df.loc[4, "premise"] = "\n".join(long[k:k + 70] for k in range(0, len(long), 70))
    assert len(df.at[4, "premise"]) > MAX
    with pytest.raises(ValueError, match="has a field longer than 100,000 characters"):
        multinli.read_multinli(write_multinli_table(tmp_path / "q", df), tokenizer)


# --------------------------------------------------------------------------- 6: every profile


@pytest.mark.parametrize("profile", ["smoke", "default", "paper"])
def test_every_text_profile_builds_its_teacher_and_student_on_multinli(tmp_path, bert_dir, profile):
    root = tmp_path / "mnli"
    make_fake_multinli(root)
    run = rundir.setup(tmp_path / "run", tmp_path / "fig", profile, "multinli", str(root), [0], "cpu",
                       teacher_model=bert_dir, student_model=bert_dir)
    train = run.splits()["train"]
    assert train.vocab_size == len(transformers.AutoTokenizer.from_pretrained(bert_dir))
    assert train.x.shape[2] <= TEXT_PROFILES[profile].max_length
    teacher, student = build.build_teacher(run).eval(), build.build_student(run, 0).eval()
    with torch.no_grad():
        assert teacher(train.x[:5]).shape == (5, 3)
        out = student(train.x[:5])
    assert out.logits.shape == out.exit_logits.shape == (5, 3)
    assert student.exit_layer == TEXT_PROFILES[profile].exit_stage
    if profile != "paper":                              # built in code for the tokenizer's ids
        assert teacher.encoder.config.vocab_size == train.vocab_size
        assert teacher.encoder.config.hidden_size == TEXT_PROFILES[profile].teacher_widths[0]


def test_multinli_smoke_runs_every_notebook_on_the_fake_folder(tmp_path, bert_dir):
    root = tmp_path / "mnli"
    make_fake_multinli(root, {s: tuple(7 * c for c in cs) for s, cs in TEXT_COUNTS.items()})
    out = tmp_path / "out"
    rc = pipeline.main(["--profile", "smoke", "--dataset", "multinli", "--data-root", str(root),
                        "--teacher-model", str(bert_dir), "--device", "cpu", "--out", str(out),
                        "--figures", str(out / "figures"), "--quiet"])
    assert rc == 0, "the multinli smoke pipeline failed; see the executed notebook named above"
    run_dir = out / "multinli-smoke"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["notebooks"] and all(v["status"] == "ok" for v in manifest["notebooks"].values())
    groups = pd.read_csv(run_dir / "groups.csv")
    assert (groups.groupby("split").group.nunique() == 6).all()
    assert set(pd.read_csv(run_dir / "summary.csv").method) == set(TEXT_PROFILES["smoke"].methods)


# --------------------------------------------------------------------------- 7: both folders first


@pytest.fixture
def no_kernel(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a kernel was started")
    monkeypatch.setattr(pipeline, "run_notebook", refuse)


def test_both_model_folders_are_checked_before_any_kernel(tmp_path, bert_dir, capsys, no_kernel):
    root = tmp_path / "mnli"
    make_fake_multinli(root)
    student = tmp_path / "student"
    shutil.copytree(bert_dir, student)
    (student / "config.json").unlink()
    teacher = tmp_path / "teacher"                      # weights, but no tokenizer
    teacher.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / f, teacher / f)

    def main(*extra):
        return pipeline.main(["--profile", "paper", "--dataset", "multinli", "--data-root", str(root),
                              "--out", str(tmp_path / "out"), "--quiet", *extra])

    assert main("--teacher-model", str(teacher), "--student-model", str(student)) == 1
    err = capsys.readouterr().err
    assert "--student-model" in err and "no config.json" in err           # both, in one error
    assert "--teacher-model (the tokenizer)" in err and "not a tokenizer folder" in err
    deep = tmp_path / "one_layer"
    make_fake_bert_folder(deep, layers=1)                                  # paper's exit reads layer 2
    assert main("--teacher-model", str(bert_dir), "--student-model", str(deep)) == 1
    assert "exit_stage=2" in capsys.readouterr().err
    (deep / "model.safetensors").unlink()
    assert main("--teacher-model", str(bert_dir), "--student-model", str(deep), "--set",
                "exit_stage=1") == 1
    assert "holds no weights" in capsys.readouterr().err
    # smoke builds its models in code: the teacher folder only lends its tokenizer
    text_models.check_model_folders(TEXT_PROFILES["smoke"], "multinli", student, None)
    with pytest.raises(ValueError, match="pass --teacher-model DIR"):
        text_models.check_model_folders(TEXT_PROFILES["smoke"], "multinli", None, None)
