"""Hatch build hook: a wheel carries the reliable-UDP core compiled with mypyc where the
machine that builds it has a C compiler (``tools/compile_core.py --into``), and is then a
wheel for that platform and Python version; otherwise, or with ``NETLIB_PURE_PYTHON=1``,
it is the pure-Python wheel. Editable installs are left alone: ``make`` compiles the core
beside the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CompiledCoreHook(BuildHookInterface):  # type: ignore[misc]  (hatchling: no stubs here)
    PLUGIN_NAME = "custom"
    _work: str | None = None  # the build's temporary directory

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        if os.environ.get("NETLIB_PURE_PYTHON"):
            return
        self._work = tempfile.mkdtemp(prefix="netlib-wheel-core-")
        compiled = Path(self._work, "_compiled")
        script = Path(self.root, "tools", "compile_core.py")
        done = subprocess.run([sys.executable, str(script), "--into", str(compiled)])
        if done.returncode != 0:
            return  # the script said why: a pure-Python wheel
        build_data["force_include"][str(compiled)] = "netlib/sansio/reliable/_compiled"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
