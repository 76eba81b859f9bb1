"""Compile the reliable-UDP core with mypyc into ``netlib/sansio/reliable/_compiled/``.

::

    python tools/compile_core.py [--force]

The core's modules (``netlib.sansio.reliable.COMPILED_MODULES``) are plain Python checked
by mypy --strict; mypyc turns them into C extension modules that run the same code with
native attribute access and calls (measured in benchmarks/README.md, "A compiled core").
The build goes beside the sources with the digest of what it compiled, and the package
uses it only while that digest matches (``netlib/sansio/reliable/__init__.py``), so a
stale build never runs. Needs mypy (the ``dev`` extra), setuptools and a C compiler;
without them it says so in one line, exits 1, and netlib runs the core as Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netlib.sansio import reliable  # noqa: E402

GROUP = "netlib.sansio.reliable._core"  # the shared library: one per build, in the package


def missing_tool() -> str | None:
    """Why a build cannot start here, or None."""
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    for module in ("mypyc", "setuptools"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed"
    return None


def build(work: Path) -> None:
    """Build the extension modules under ``work/lib`` (run in a child process: the C
    compiler's output is shown only if the build fails)."""
    from mypyc.build import mypycify
    from setuptools import Distribution

    sources = [f"netlib/sansio/reliable/{name}.py" for name in reliable.COMPILED_MODULES]
    # the modules the core imports are read for their types, not checked again here (a
    # wheel's build has netlib's dependencies but not every extra's)
    options = ["--follow-imports=silent"]
    extensions = mypycify([*options, *sources], group_name=GROUP, target_dir=str(work / "c"))
    distribution = Distribution({"name": "netlib-core", "ext_modules": extensions})
    command = distribution.get_command_obj("build_ext")
    command.build_lib = str(work / "lib")
    command.build_temp = str(work / "temp")
    distribution.run_command("build_ext")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="build even if up to date")
    parser.add_argument(
        "--into", type=Path, help="put the build there (a wheel's build) instead of beside"
    )
    parser.add_argument("--build-in", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_in is not None:
        build(args.build_in)
        return 0
    target = reliable.COMPILED_DIR if args.into is None else args.into.resolve()
    if args.into is None and not args.force and reliable.build_matches(target):
        print("compile_core: the compiled core is up to date")
        return 0
    problem = missing_tool()
    if problem is not None:
        print(f"compile_core: not compiled: {problem}; the core runs as Python")
        return 1
    digest = reliable.sources_digest()
    with tempfile.TemporaryDirectory(prefix="netlib-core-") as tmp:
        child = [sys.executable, __file__, "--build-in", tmp]
        done = subprocess.run(child, cwd=ROOT, capture_output=True, text=True)
        built = sorted(Path(tmp, "lib", *GROUP.split(".")[:-1]).glob("*.so"))
        if done.returncode != 0 or not built:
            print((done.stdout + done.stderr)[-3000:], file=sys.stderr)
            print("compile_core: the build failed (above); the core runs as Python")
            return 1
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in built:
            shutil.copy2(path, target / path.name)
        (target / reliable.DIGEST_FILE).write_text(digest + "\n")
    print(f"compile_core: {len(built)} modules compiled into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
