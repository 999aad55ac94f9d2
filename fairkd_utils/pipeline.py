"""Run the study's numbered notebooks in order through papermill.

    python -m fairkd_utils.pipeline --profile smoke
    python -m fairkd_utils.pipeline --dataset waterbirds --data-root /data/waterbird_complete95_forest2water2 --profile paper --device cuda

Each notebook receives the same parameters (absolute paths, profile, dataset,
seeds, device); notebooks share nothing but the files of the run directory
``<out>/<dataset>-<profile>/``. A failing cell stops the run with a non-zero
exit naming the notebook and the cell.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from . import records
from .profiles import PROFILES, get_profile

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DATASETS = ("synthetic", "waterbirds", "celeba", "folder")
DEVICES = ("auto", "cpu", "cuda")
NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.py$")
#: Packages whose versions go into manifest.json.
MANIFEST_PACKAGES = ("torch", "torchvision", "laplace-torch", "numpy", "pandas",
                     "matplotlib", "seaborn", "papermill", "jupytext")


class PipelineError(RuntimeError):
    """A notebook failed; the message names the notebook and the cell."""


def discover_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered percent notebooks ``NN_name.py`` in order."""
    found = sorted(p for p in Path(folder).glob("*.py") if NOTEBOOK_PATTERN.match(p.name))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.py) in {folder}")
    return found


def select_notebooks(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    if not only:
        return notebooks
    wanted = {f"{int(n):02d}" for n in only}
    known = {p.name[:2] for p in notebooks}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: no such notebook; known: {sorted(known)}")
    return [p for p in notebooks if p.name[:2] in wanted]


def resolve_device(name: str) -> str:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES}")
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    return name


def notebook_parameters(args, run_dir: Path, figures_dir: Path, device: str) -> dict:
    """The parameters every notebook's ``parameters`` cell defines (JSON-like values only)."""
    profile = get_profile(args.profile)
    seeds = list(args.seeds) if args.seeds else list(profile.seeds)
    return {
        "run_dir": str(run_dir),
        "figures_dir": str(figures_dir),
        "profile": args.profile,
        "dataset": args.dataset,
        "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
        "seeds": seeds,
        "device": device,
    }


def optional_parameters(args) -> dict:
    """Parameters only the notebooks that declare them receive (notebook 05)."""
    optional = {}
    if getattr(args, "sweep", False):
        optional["sweep"] = True
    if getattr(args, "hparams", None):
        path = Path(args.hparams).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--hparams {args.hparams}: no such file (a sweep writes "
                                    "<run_dir>/sweep/hparams.json)")
        optional["hparams_file"] = str(path)
    return optional


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in MANIFEST_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def declared_parameters(nb) -> set[str]:
    """Names assigned in a notebook's cell tagged ``parameters``."""
    import ast

    names = set()
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign):
                    names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def run_notebook(src: Path, out_path: Path, parameters: dict, cwd: Path, progress: bool = True,
                 optional: dict | None = None):
    """Execute one percent notebook with papermill; raise PipelineError naming the cell.
    ``optional`` parameters go only to notebooks whose parameters cell defines them."""
    import jupytext
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb = jupytext.read(src)
    if optional:
        declared = declared_parameters(nb)
        parameters = {**parameters, **{k: v for k, v in optional.items() if k in declared}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(nb, str(out_path), parameters=parameters, kernel_name="python3",
                            language="python", cwd=str(cwd), progress_bar=progress,
                            log_output=False)
    except PapermillExecutionError as err:
        raise PipelineError(
            f"notebook {src.name} failed in cell {err.cell_index} "
            f"(execution count {err.exec_count}): {err.ename}: {err.evalue}\n"
            f"the executed notebook with the traceback is {out_path}"
        ) from None
    except Exception as err:  # the kernel died (e.g. out of memory) or a cell timed out
        raise PipelineError(
            f"notebook {src.name} failed in cell {_running_cell(out_path)}: "
            f"{type(err).__name__}: {err}\nthe partly executed notebook is {out_path}"
        ) from None


def _running_cell(out_path: Path) -> str:
    """Index of the cell papermill marked as running when execution broke off."""
    import nbformat

    try:
        nb = nbformat.read(str(out_path), as_version=4)
    except Exception:
        return "?"
    for i, cell in enumerate(nb.cells):
        if cell.get("metadata", {}).get("papermill", {}).get("status") == "running":
            return str(i)
    return "?"


def run(args) -> Path:
    profile = get_profile(args.profile)  # fails early on an unknown profile
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; choose one of {DATASETS}")
    if args.dataset != "synthetic" and not args.data_root:
        raise ValueError(f"--dataset {args.dataset} reads a local folder: pass --data-root PATH "
                         "(see README, 'Your own data')")
    notebooks = select_notebooks(discover_notebooks(), args.only)
    device = resolve_device(args.device)
    run_dir = (Path(args.out) / f"{args.dataset}-{args.profile}").resolve()
    figures_dir = Path(args.figures or REPO_ROOT / "figures" / f"{args.dataset}-{args.profile}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    params = notebook_parameters(args, run_dir, figures_dir, device)
    optional = optional_parameters(args)

    manifest_path = run_dir / "manifest.json"
    earlier = {}
    if args.only and manifest_path.exists():  # keep the other notebooks' entries
        import json

        earlier = json.loads(manifest_path.read_text()).get("notebooks", {})
    manifest = {
        "git_sha": _git_sha(),
        "versions": _versions(),
        "command": " ".join([Path(sys.executable).name, "-m", "fairkd_utils.pipeline", *sys.argv[1:]]),
        "config": {"profile": profile.to_dict(), "parameters": {**params, **optional}},
        "device": device,
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notebooks": dict(earlier),
    }
    total = time.perf_counter()
    for src in notebooks:
        print(f"[fairkd] {src.stem}  ({args.dataset}, {args.profile}, device={device})", flush=True)
        t0 = time.perf_counter()
        entry = {"status": "running"}
        manifest["notebooks"][src.stem] = entry
        records.write_json(manifest_path, manifest)
        try:
            run_notebook(src, run_dir / "executed" / f"{src.stem}.ipynb", params, cwd=run_dir,
                         progress=not args.quiet,
                         optional=optional)
        except PipelineError:
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 2))
            records.write_json(manifest_path, manifest)
            raise
        entry.update(status="ok", seconds=round(time.perf_counter() - t0, 2))
        print(f"[fairkd] {src.stem} done in {entry['seconds']:.1f} s", flush=True)
    manifest["total_seconds"] = round(time.perf_counter() - total, 2)
    records.write_json(manifest_path, manifest)
    print(f"[fairkd] all done in {manifest['total_seconds']:.1f} s -> {run_dir} (figures: {figures_dir})")
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairkd_utils.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="models and budgets (default: %(default)s)")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="the data (default: %(default)s, built in)")
    p.add_argument("--data-root", default=None, help="local folder of a real dataset")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="student seeds (default: the profile's)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--out", default=str(REPO_ROOT / "results"),
                   help="parent of the run directory (default: results/)")
    p.add_argument("--figures", default=None,
                   help="figures folder (default: figures/<dataset>-<profile>/)")
    p.add_argument("--only", nargs="+", default=None, metavar="NN",
                   help="run only these notebooks, e.g. --only 04 05 (their prerequisites must exist)")
    p.add_argument("--sweep", action="store_true",
                   help="rerun the hyper-parameter sweep on validation worst-group accuracy "
                        "(notebook 05; writes sweep/hparams.json and uses it)")
    p.add_argument("--hparams", default=None, metavar="FILE",
                   help="chosen hyper-parameters (default: fairkd_utils/hparams.json's entry "
                        "for <dataset>-<profile>)")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (PipelineError, ValueError, FileNotFoundError) as err:
        print(f"[fairkd] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
