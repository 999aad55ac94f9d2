"""Hyper-parameter files are never mixed silently with the library's defaults: an entry
is complete for the methods a run trains, every value has its type, a value the method
does not read is refused, the runner checks the file before any kernel starts, and it
says so when the hyper-parameters differ from those that made the run's tables."""

import json

import pytest

from fairkd_utils import hparams, pipeline, profiles, rundir, runner_checks


def _run(tmp_path, entry, name="synthetic-smoke"):
    path = tmp_path / "h.json"
    path.write_text(json.dumps({name: entry}))
    return rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=profiles.get_profile("smoke"),
                      dataset="synthetic", data_root=None, seeds=[0], device="cpu",
                      hparams_file=str(path))


COMPLETE = {"kd": {"lam": 0.9, "T": 4.0}, "dedier": {"beta": 2.0}, "dedier_both": {"beta": 1.0},
            "laplace_kd": {"beta": 4.0, "score": "margin"}}


def test_a_partial_entry_stops_naming_what_is_missing_instead_of_taking_library_defaults(tmp_path):
    run = _run(tmp_path, {"kd": {"lam": 0.9}, "dedier_both": {"beta": 1.0}})
    with pytest.raises(ValueError, match=r"h\.json\['synthetic-smoke'\] lacks kd's T \(read by kd\)"):
        hparams.method_config(run, "kd")
    with pytest.raises(ValueError, match="lacks kd's T"):
        hparams.method_config(run, "shuffled")
    with pytest.raises(ValueError, match=r"lacks kd's T \(read by dedier\), dedier's beta \(read by dedier\)"):
        hparams.method_config(run, "dedier")
    assert hparams.method_config(run, "erm").lam == 0.0      # erm reads nothing from the file
    # the methods a run trains, all at once
    missing = profiles.missing_hparams({"kd": {"lam": 0.9}}, ["erm", "kd", "shuffled", "jtt"])
    assert missing == ["kd's T (read by kd, shuffled, jtt)", "dedier_both's beta (read by shuffled)",
                       "jtt's jtt_epochs (read by jtt)", "jtt's jtt_upweight (read by jtt)"]
    run = _run(tmp_path, COMPLETE)
    assert {m: hparams.method_config(run, m).beta for m in ("dedier", "shuffled", "laplace_kd")} == \
        {"dedier": 2.0, "shuffled": 1.0, "laplace_kd": 4.0}


@pytest.mark.parametrize("method, value, message", [
    ("dedier", {"beta": True}, r"dedier's beta: expected a number, got true"),
    ("kd", {"lam": 0.9, "T": "4"}, r"kd's T: expected a number, got \"4\""),
    ("kd", {"lam": 0.9, "T": float("inf")}, r"kd's T: expected a finite number"),
    ("jtt", {"jtt_epochs": 1.5, "jtt_upweight": 5}, r"jtt's jtt_epochs: expected a whole number, got 1.5"),
    ("laplace_kd", {"beta": 1.0, "score": 3}, r"laplace_kd's score: expected text"),
    ("kd", [0.9, 4], r"'kd' must be an object of field: value, e.g. \{\"lam\": 0.9, \"T\": 4.0\}, got \[0.9, 4\]"),
])
def test_a_value_of_the_wrong_type_or_shape_is_named(tmp_path, method, value, message):
    run = _run(tmp_path, {**COMPLETE, method: value})
    with pytest.raises(ValueError, match=message):
        hparams.read_hparams(run.hparams_file)
    with pytest.raises(ValueError, match=message):
        hparams.method_config(run, "erm")


@pytest.mark.parametrize("method, value, message", [
    ("shuffled", {"beta": 9.0}, "shuffled does not read its own beta: it takes dedier_both's"),
    ("kd", {"lam": 0.9, "T": 4.0, "beta": 1.0}, "kd does not read beta"),
    ("dedier", {"beta": 1.0, "score": "entropy"}, "dedier does not read score"),
    ("erm", {"T": 2.0}, "erm does not read T"),
    ("dedier", {"lam": 0.5, "beta": 1.0}, "lam and T are kd's"),
])
def test_a_value_the_method_does_not_read_is_refused(tmp_path, method, value, message):
    run = _run(tmp_path, {**COMPLETE, method: value})
    with pytest.raises(ValueError, match=message):
        hparams.method_config(run, "kd")


def test_the_committed_file_is_complete_and_well_formed():
    chosen = hparams.read_hparams(hparams.HPARAMS_FILE)
    assert profiles.missing_hparams(chosen["synthetic-default"],
                                    profiles.resolve_methods(profiles.get_profile("default"), "extended")) == []
    assert profiles.missing_hparams(chosen["synthetic_text-default"], profiles.DEFAULT_METHODS) == []


# ---------------------------------------------------------------- the runner, before any kernel
@pytest.fixture
def no_kernel(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a kernel was started")
    monkeypatch.setattr(pipeline, "run_notebook", refuse)


@pytest.mark.parametrize("content, message", [
    ({"synthetic-smoke": {"kd": {"lam": 0.9}}}, "lacks kd's T"),
    ({"synthetic-smoke": {**COMPLETE, "kd": [0.9, 4]}}, "'kd' must be an object of field: value"),
    ({"synthetic-smoke": {**COMPLETE, "dedier": {"beta": True}}}, "expected a number, got true"),
    ({"synthetic-smoke": {**COMPLETE, "shuffled": {"beta": 2.0}}}, "takes dedier_both's"),
    ({"synthetic-default": COMPLETE}, "has no entry for 'synthetic-smoke'"),
    (["not", "an", "object"], "must hold an object keyed by"),
])
def test_the_runner_checks_the_hparams_file_before_any_kernel(tmp_path, capsys, no_kernel, content, message):
    path = tmp_path / "h.json"
    path.write_text(json.dumps(content))
    rc = pipeline.main(["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path / "out"),
                        "--only", "01", "--hparams", str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "synthetic-smoke").exists()


def test_the_runner_checks_the_committed_entry_for_the_methods_it_trains(tmp_path, capsys, no_kernel,
                                                                        monkeypatch):
    committed = tmp_path / "committed.json"
    committed.write_text(json.dumps({"synthetic-smoke": {"kd": {"lam": 0.9, "T": 2.0}}}))
    monkeypatch.setattr(runner_checks, "HPARAMS_FILE", committed)
    assert pipeline.main(["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path),
                          "--only", "01"]) == 1
    err = capsys.readouterr().err
    assert "committed.json['synthetic-smoke'] lacks dedier's beta (read by dedier)" in err


# ---------------------------------------------------------------- the runner says when they change
FAKE_05 = '''\
# %% tags=["parameters"]
run_dir = None
figures_dir = None
profile = "smoke"
dataset = "synthetic"
data_root = None
seeds = None
device = "cpu"
hparams_file = None

# %%
import fairkd_utils as fk
run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, "cpu",
                      hparams_file=hparams_file)
fk.hparams.record_hparams(run, {m: fk.hparams.method_config(run, m) for m in ("erm", "kd")})
'''


def test_the_runner_says_when_the_hyperparameters_differ_from_those_of_the_tables(
        tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "notebooks" / "01_fake_hparams.py").write_text(FAKE_05)
    monkeypatch.setattr(pipeline, "REPO_ROOT", repo)
    monkeypatch.setattr(runner_checks, "REPO_ROOT", repo)
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", repo / "notebooks")
    swept = tmp_path / "sweep.json"
    swept.write_text(json.dumps({"synthetic-smoke": COMPLETE}))
    main = ["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path / "out"), "--quiet"]
    assert pipeline.main([*main, "--hparams", str(swept)]) == 0
    recorded = json.loads((tmp_path / "out" / "synthetic-smoke" / "hparams_used.json").read_text())
    assert recorded["configs"]["kd"]["T"] == 4.0 and recorded["file"] == str(swept)
    assert "differ" not in capsys.readouterr().out
    assert pipeline.main(main) == 0                 # the library defaults (no smoke entry)
    out = capsys.readouterr().out
    assert "hyper-parameters differ from those that made this run's tables" in out, out
    assert "kd: T 4.0 -> 2.0, lam 0.9 -> 0.5;" in out
    assert f"--hparams {swept}" in out              # how to get the earlier ones back
    assert pipeline.main(main) == 0                 # the same again: nothing to say
    assert "differ" not in capsys.readouterr().out
