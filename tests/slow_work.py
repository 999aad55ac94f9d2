"""A run whose data take a minute to load, for tests of the local workers' lifetime
(tests/test_runner_safety.py): a worker says it started, then waits."""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fairkd_utils.rundir import Run


@dataclass
class SlowRun(Run):
    def splits(self):
        out = Path(self.run_dir).parent
        (out / f"started-{os.getpid()}").write_text("")
        time.sleep(60)
        (out / f"finished-{os.getpid()}").write_text("")
        raise RuntimeError("a slow run never loads data")
