"""Artifacts are written atomically and a rerun replaces exactly its own rows."""

import pandas as pd
import pytest

from fairkd_utils import records


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "table.csv"
    records.write_text(path, "old\n")

    def broken(fh):
        fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        records.atomic_write(path, broken, mode="w")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_rerun_replaces_only_its_own_record(tmp_path):
    def row(name, seconds):
        return [{"stage": "student", "name": name, "seconds": seconds, "reused": False}]

    records.write_record(tmp_path, "timings", "student-kd-seed0", row("kd0", 0.5))
    records.write_record(tmp_path, "timings", "student-kd-seed1", row("kd1", 0.6))
    records.write_record(tmp_path, "timings", "student-kd-seed0", row("kd0", 0.7))
    table = records.assemble(tmp_path, "timings")
    assert sorted(zip(table.name, table.seconds)) == [("kd0", 0.7), ("kd1", 0.6)]
    assert pd.read_csv(tmp_path / "timings.csv").shape == (2, 4)


def test_unknown_record_kind_and_missing_prerequisite_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown record kind"):
        records.write_record(tmp_path, "logits", "x", [])
    with pytest.raises(FileNotFoundError, match="run notebook 02_teacher first"):
        records.require(tmp_path / "teacher_logits.pt", "02_teacher")


def test_torch_checkpoint_round_trips_with_weights_only(tmp_path):
    import torch

    records.torch_save(tmp_path / "c.pt", {"w": torch.arange(3.0), "fingerprint": "abc"})
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["fingerprint"] == "abc" and torch.equal(back["w"], torch.arange(3.0))


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    path = records.write_text(tmp_path / "t.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
