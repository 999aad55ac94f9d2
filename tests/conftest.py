"""Shared fixtures. The whole smoke pipeline runs once per test session; tests
that check its outputs read from the same run directory."""

import os
import tempfile

import pytest

# Two cores on CI: keep torch from oversubscribing them in the test process.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The image-decoding cache of real datasets: never the user's home folder in tests.
os.environ.setdefault("FAIRKD_CACHE_DIR", os.path.join(tempfile.mkdtemp(prefix="fairkd-cache-")))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Run every notebook with ``--profile smoke`` into a temporary folder."""
    from fairkd_utils import pipeline

    out = tmp_path_factory.mktemp("smoke")
    rc = pipeline.main(["--profile", "smoke", "--out", str(out), "--figures",
                        str(out / "figures"), "--quiet"])
    assert rc == 0, "the smoke pipeline failed; see the executed notebook named above"
    return out / "synthetic-smoke"


@pytest.fixture(scope="session")
def text_smoke_run(tmp_path_factory):
    """Run every notebook with ``--profile smoke --dataset synthetic_text``."""
    from fairkd_utils import pipeline

    out = tmp_path_factory.mktemp("text-smoke")
    rc = pipeline.main(["--profile", "smoke", "--dataset", "synthetic_text", "--out", str(out),
                        "--figures", str(out / "figures"), "--quiet"])
    assert rc == 0, "the text smoke pipeline failed; see the executed notebook named above"
    return out / "synthetic_text-smoke"
