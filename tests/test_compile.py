"""``compile``: the training and validation forward passes under torch.compile
(``train.Forward``), reached from a profile field and ``--set compile=true``.

Dynamo runs with the ``eager`` backend here (no C++ compile: the plumbing is what is
tested, in seconds); ``bench/bench_pipeline.py --compile both`` measures inductor."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from fairkd_utils import models, profiles, train
from fairkd_utils.profiles import get_profile

from test_train import TINY, _cfg, _split


@pytest.fixture(scope="module")
def splits():
    return {"train": _split("train", 192, 0), "val": _split("val", 96, 1)}


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    monkeypatch.setattr(train.Forward, "backend", "eager")
    monkeypatch.setattr(train.Forward, "_seen", set())
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _student(seed):
    return models.build_student(TINY, 2, seed=seed)


def test_an_eager_forward_is_the_model_itself():
    model = _student(0).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(train.Forward(model)(x).logits, model(x).logits)
    assert counters["stats"]["unique_graphs"] == 0


def test_students_of_one_shape_share_one_compile_and_a_last_batch_runs_eagerly():
    x, last = torch.randn(8, 3, 16, 16), torch.randn(3, 3, 16, 16)
    outs = []
    for seed in (0, 1, 2):   # three students, one shape: compiled once per mode
        model = _student(seed).eval()
        fwd = train.Forward(model, compiled=True)
        with torch.no_grad():
            out = fwd(x)
            fwd.done()
            assert torch.allclose(out.logits, model(x).logits, atol=1e-5)
            fwd(last)    # the smaller last batch: eager, no recompile
        outs.append(out.logits)
    assert counters["stats"]["unique_graphs"] == 1
    assert not torch.allclose(outs[0], outs[1])   # each student's own weights were used


def test_train_and_eval_modes_compile_once_each_and_log_their_compile(splits, caplog):
    caplog.set_level(logging.INFO, logger="fairkd")
    for seed in (0, 1):
        train.train_model(_student(seed), splits, _cfg(epochs=1, seed=seed, compile=True),
                          name=f"student-{seed}")
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled")]
    # one training key (64-instance batches, grad) and one validation key (96, no grad)
    assert len(compiled) == 2, compiled
    assert any("True, True" in m for m in compiled) and any("False, False" in m for m in compiled)


def test_compile_is_a_profile_field_that_set_reaches_and_the_fingerprint_sees():
    prof = profiles.apply_overrides(get_profile("smoke"), profiles.parse_overrides(["compile=true"]))
    assert prof.compile is True and get_profile("default").compile is False
    assert train.TrainConfig.from_profile(prof, "student").compile is True
    assert train.TrainConfig.from_profile(prof, "teacher").compile is True
    eager, compiled = _cfg(), _cfg(compile=True)
    assert "compile" not in train.TrainConfig.RUNTIME_FIELDS and eager.to_dict() != compiled.to_dict()
