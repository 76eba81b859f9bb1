"""The compiled core (tools/compile_core.py) runs only while it matches the sources."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from netlib.sansio import reliable
from netlib.sansio.reliable import connection


def _fake_build(directory: Path, digest: str, modules: tuple[str, ...]) -> None:
    directory.mkdir()
    (directory / reliable.DIGEST_FILE).write_text(digest + "\n")
    for name in modules:
        (directory / f"{name}{EXTENSION_SUFFIXES[0]}").write_bytes(b"")


@pytest.fixture
def build_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("NETLIB_PURE_PYTHON", raising=False)
    monkeypatch.setattr(reliable, "COMPILED_DIR", tmp_path / "_compiled")
    return tmp_path / "_compiled"


def test_a_build_of_these_sources_for_this_interpreter_is_used(build_dir: Path) -> None:
    _fake_build(build_dir, reliable.sources_digest(), reliable.COMPILED_MODULES)
    assert reliable._compiled_build_usable()


def test_a_build_of_other_sources_is_not_used(build_dir: Path) -> None:
    _fake_build(build_dir, "0" * 64, reliable.COMPILED_MODULES)
    assert not reliable._compiled_build_usable()


def test_a_build_missing_a_module_is_not_used(build_dir: Path) -> None:
    _fake_build(build_dir, reliable.sources_digest(), reliable.COMPILED_MODULES[:-1])
    assert not reliable._compiled_build_usable()


def test_a_build_for_another_interpreter_is_not_used(build_dir: Path) -> None:
    _fake_build(build_dir, reliable.sources_digest(), ())
    for name in reliable.COMPILED_MODULES:
        (build_dir / f"{name}.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    assert not reliable.build_matches(build_dir)
    assert not reliable._compiled_build_usable()


def test_no_build_and_the_pure_python_switch_mean_python(
    build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not reliable._compiled_build_usable()  # no directory at all
    _fake_build(build_dir, reliable.sources_digest(), reliable.COMPILED_MODULES)
    monkeypatch.setenv("NETLIB_PURE_PYTHON", "1")
    assert not reliable._compiled_build_usable()


def test_the_core_is_imported_from_the_form_the_package_chose() -> None:
    """With a current build (``make`` compiles one where it can) the modules come from it;
    without one, or with NETLIB_PURE_PYTHON=1, from the sources."""
    loaded = Path(connection.__file__ or "")
    if reliable.COMPILED:
        assert loaded.parent == reliable.COMPILED_DIR
        assert loaded.name != "connection.py"
    else:
        assert loaded == Path(reliable.__file__).parent / "connection.py"
    assert reliable.core_kind() == ("compiled (mypyc)" if reliable.COMPILED else "Python")
