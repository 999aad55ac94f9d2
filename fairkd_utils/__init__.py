"""fairkd_utils: the thin library under the fairkd notebooks.

One concept per module: ``data``, ``models``, ``losses``, ``exit_laplace``,
``train``, ``metrics``, ``plots``, ``records``, ``pipeline`` and ``profiles``.
Notebooks ``import fairkd_utils as fk`` and call small named functions.
"""

import importlib

__version__ = "0.1.0"

_MODULES = ("data", "models", "losses", "exit_laplace", "train", "metrics",
            "plots", "records", "pipeline", "profiles", "experiment")


def __getattr__(name):
    # Lazy submodule access (fk.data, fk.plots, ...) keeps `import fairkd_utils`
    # cheap for the runner, which does not need torch in its own process.
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fairkd_utils' has no attribute {name!r}")
