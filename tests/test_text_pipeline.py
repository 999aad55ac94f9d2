"""The text study end to end: ``--dataset synthetic_text --profile smoke`` through
papermill, the same six notebooks as the images, three classes and six groups."""

import json

import pandas as pd

from fairkd_utils import pipeline
from fairkd_utils.profiles import DEFAULT_METHODS as METHODS, TEXT_PROFILES, get_profile

TEXT_FIGURES = ["01_group_counts", "02_teacher_group_acc", "03_exit_vs_final_group_acc",
                "03_exit_confidence_by_group", "04_map_vs_laplace_confidence", "04_reliability",
                "04_score_auroc", "05_weights_by_group", "06_wga_vs_avg", "06_group_acc_heatmap",
                "06_weight_distributions", "06_paired_differences"]


def test_text_datasets_get_the_text_profiles():
    assert get_profile("default", "synthetic_text") is TEXT_PROFILES["default"]
    assert get_profile("default", "multinli") is TEXT_PROFILES["default"]
    assert get_profile("default", "synthetic").teacher_arch == "narrow_resnet"
    paper = get_profile("paper", "multinli")
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.max_length) == ("adamw", 2e-5, 32, 128)


def test_text_smoke_run_executes_every_notebook(text_smoke_run):
    manifest = json.loads((text_smoke_run / "manifest.json").read_text())
    assert [n for n in manifest["notebooks"]] == [p.stem for p in pipeline.discover_notebooks()]
    assert all(v["status"] == "ok" for v in manifest["notebooks"].values())
    assert manifest["config"]["parameters"]["dataset"] == "synthetic_text"


def test_text_smoke_run_has_six_groups_three_classes_and_every_method(text_smoke_run):
    groups = pd.read_csv(text_smoke_run / "groups.csv")
    assert (groups.groupby("split").group.nunique() == 6).all()
    assert set(groups.y) == {0, 1, 2} and set(groups.a) == {0, 1}
    m = pd.read_csv(text_smoke_run / "metrics.csv")
    students = m[(m.model == "student") & (m.split == "test")]
    assert set(students.method) == set(METHODS)
    assert (students.groupby(["method", "seed"]).group_name.nunique() == 7).all()  # 6 + "all"
    laplace = m[(m.model == "exit_laplace") & (m.split == "test")]
    assert {"mc", "probit"} <= set(laplace.predictive)
    s = pd.read_csv(text_smoke_run / "summary.csv")
    assert set(s.method) == set(METHODS) and "diff_vs_dedier_both_mean" in s.columns


def test_text_smoke_run_draws_the_figures_and_shows_example_pairs(text_smoke_run):
    figures = text_smoke_run.parent / "figures"
    for slug in TEXT_FIGURES:
        assert (figures / f"{slug}.png").stat().st_size > 1000, slug
    nb = json.loads((text_smoke_run / "executed" / "01_data_and_groups.ipynb").read_text())
    html = "".join("".join(o.get("data", {}).get("text/html", "")) for c in nb["cells"]
                   for o in c.get("outputs", []))
    assert "premise" in html and "hypothesis" in html  # the example-pair table
