"""Sphinx configuration of netlib's documentation site: ``make docs``."""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

import netlib

project = "netlib"
author = "the netlib developers"
project_copyright = "2026, the netlib developers"
release = netlib.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples"]

# Markdown: fenced code stays fenced code; ``(label)=`` targets and ``#heading`` anchors
# resolve across pages.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# The site is built offline (no intersphinx), so references to the standard library
# (asyncio.Protocol, ssl.SSLContext, ...) cannot resolve: nitpicky mode checks netlib's own
# names only.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(asyncio|ssl|socket|os|pathlib|collections\.abc|typing|typing_extensions|enum)\..*",
    ),
    # private names in signatures of classes netlib builds for you (Server, Datagram)
    (r"py:.*", r"(.*\.)?_\w+"),
]
nitpick_ignore = [
    # the asyncio adapters that the public Protocol classes are built on: internal
    ("py:class", "StreamProtocol"),
    ("py:class", "netlib.aio.stream.StreamProtocol"),
    ("py:class", "DatagramEndpointProtocol"),
    ("py:class", "netlib.aio.datagram.DatagramEndpointProtocol"),
    # the type variable of run()'s signature
    ("py:class", "netlib.runner.T"),
    # pathlib.Path as LocalNatsServer's annotations name it
    ("py:class", "Path"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_inherit_docstrings = False
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"netlib {release}"


def _resolve_public_name(
    app: Sphinx, env: BuildEnvironment, node: Any, contnode: nodes.TextElement
) -> nodes.reference | None:
    """Resolve ``netlib.server.Server`` or ``Server`` to ``netlib.Server``, where it is documented.

    Type hints name classes by the module that defines them; the reference documents each
    public name once, as ``netlib.<name>``.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    name = target.rpartition(".")[2]
    public = f"netlib.{name}"
    if name not in netlib.__all__ or target == public:
        return None
    domain: Any = env.get_domain("py")
    ref: nodes.reference | None = domain.resolve_xref(
        env, node["refdoc"], app.builder, "obj", public, node, contnode
    )
    return ref


def _protocol_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """Show no constructor for ``typing.Protocol`` classes: they describe, not construct."""
    if what == "class" and getattr(obj, "_is_protocol", False):
        return "", return_annotation
    return None


def _drop_object_base(app: Sphinx, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """ "Bases: object" says nothing: show bases only where there is one to see."""
    if bases == [object]:
        bases.clear()


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-bases", _drop_object_base)
    app.connect("missing-reference", _resolve_public_name)
    app.connect("autodoc-process-signature", _protocol_signature)
    return {"parallel_read_safe": True}
