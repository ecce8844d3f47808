"""Execute the notebooks in ``notebooks/`` top to bottom, as CI and ``make notebooks`` do.

Each notebook runs in a fresh IPython kernel of this interpreter (the virtual environment's
Python, whatever kernels Jupyter has registered elsewhere) and its executed copy is written
to another folder: the committed notebooks stay without outputs. A cell that raises, or a
notebook that runs longer than its time limit, fails the run.

    python tests/run_notebooks.py [--out DIR] [--timeout SECONDS] [NOTEBOOK ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets import default
from traitlets.config import Config

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO_DIR, "notebooks")
KERNEL = "persistroids-python"


def notebooks() -> list[str]:
    """Paths of the notebooks in ``notebooks/``, in name order."""
    return sorted(os.path.join(NOTEBOOK_DIR, n) for n in os.listdir(NOTEBOOK_DIR)
                  if n.endswith(".ipynb"))


def kernel(root: str) -> tuple[type[AsyncKernelManager], Config]:
    """A kernel manager class and its settings for a kernel that runs ``sys.executable -m
    ipykernel_launcher``, named KERNEL.

    The kernel spec is written below ``root`` and the manager searches only that folder, so
    the kernel is this interpreter even where a user or system "python3" kernel spec points
    to another one, and nothing is registered globally. The kernel talks to this process
    over Unix sockets in ``root`` instead of localhost TCP ports.
    """
    folder = os.path.join(root, "kernels")
    os.makedirs(os.path.join(folder, KERNEL), exist_ok=True)
    with open(os.path.join(folder, KERNEL, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                            "{connection_file}"],
                   "display_name": "Python (persistroids-dist)", "language": "python"}, f)

    class Manager(AsyncKernelManager):
        # Not a setting: jupyter_client makes its kernel spec manager without the config.
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self) -> KernelSpecManager:
            return KernelSpecManager(kernel_dirs=[folder])

    return Manager, Config({"KernelManager": {"transport": "ipc",
                                              "ip": os.path.join(root, "kernel")}})


def execute(path: str, out_path: str | None = None, timeout_s: float = 300.0
            ) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` in a fresh kernel (working directory: its folder) and
    return it with its outputs; write that to ``out_path`` if given (also when it fails).

    Raises nbclient's CellExecutionError if a cell raises, and CellTimeoutError once the
    notebook has run ``timeout_s`` seconds (kernel start not counted: nbclient bounds it).
    """
    nb = nbformat.read(path, as_version=4)
    deadline: list[float] = []

    def cell_timeout(cell: nbformat.NotebookNode) -> int:
        # nbclient limits each cell; what is left of the notebook's time is that limit.
        if not deadline:
            deadline.append(time.monotonic() + timeout_s)
        return max(1, int(deadline[0] - time.monotonic()))

    with tempfile.TemporaryDirectory(prefix="persistroids-kernel-") as root:
        # Given a kernel name (not a kernel manager), nbclient starts the kernel and also
        # shuts it down at the end, whether the notebook failed or not.
        manager, config = kernel(root)
        client = NotebookClient(nb, kernel_name=KERNEL, kernel_manager_class=manager,
                                config=config, timeout_func=cell_timeout,
                                resources={"metadata": {"path": os.path.dirname(path)}})
        try:
            client.execute()
        finally:
            if out_path is not None:
                nbformat.write(nb, out_path)
    return nb


def main(argv: Sequence[str] | None = None) -> int:
    """Run the notebooks; exit status 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="notebooks (default: all of notebooks/)")
    parser.add_argument("--out", help="folder for the executed copies (default: a new "
                        "temporary folder)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds each notebook may run (default 300)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="persistroids-notebooks-")
    os.makedirs(out, exist_ok=True)
    failed = 0
    for path in args.paths or notebooks():
        target = os.path.join(out, os.path.basename(path))
        started = time.monotonic()
        try:
            execute(os.path.abspath(path), target, args.timeout)
        except Exception as e:  # report every notebook, then fail
            failed += 1
            print(f"FAILED {path} after {time.monotonic() - started:.0f} s: "
                  f"{type(e).__name__}\n{e}", file=sys.stderr)
        else:
            print(f"ok     {path} in {time.monotonic() - started:.0f} s -> {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
