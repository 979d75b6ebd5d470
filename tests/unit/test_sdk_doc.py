"""docs/sdk.md documents every public method, property and attribute of ``TrainContext`` and
``shipyard.Client``: a name added to either class without a line on the page fails here.

A member counts as documented when the page writes it as a user would (``ctx.<name>`` for the
context, ``Client.<name>`` for the client), in a heading or in the text. Attributes are the
public ``self.<name> = ...`` assignments of ``__init__`` (read from its source: building a
TrainContext needs a job and a process group). Each public method also has a docstring."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from shipyard.client import Client
from shipyard.runtime.context import TrainContext

PAGE = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
CLASSES = [(TrainContext, "ctx"), (Client, "Client")]


def public_members(cls) -> set[str]:
    """Methods and properties defined on ``cls`` (not inherited from object), plus the public
    attributes its ``__init__`` assigns."""
    names = {n for n, v in vars(cls).items()
             if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))}
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if (isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id == "self"
                        and not el.attr.startswith("_")):
                    names.add(el.attr)
    return names


def undocumented(cls, prefix: str, text: str) -> list[str]:
    return sorted(n for n in public_members(cls) if not re.search(rf"`{prefix}\.{re.escape(n)}\b", text))


@pytest.mark.parametrize("cls,prefix", CLASSES, ids=lambda v: getattr(v, "__name__", v))
def test_every_public_member_is_on_the_sdk_page(cls, prefix):
    missing = undocumented(cls, prefix, PAGE.read_text())
    assert not missing, f"docs/sdk.md does not document {', '.join(f'{prefix}.{n}' for n in missing)}"


@pytest.mark.parametrize("cls", [c for c, _ in CLASSES], ids=lambda c: c.__name__)
def test_every_public_method_has_a_docstring(cls):
    bare = [n for n, v in vars(cls).items() if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))
            and not (v.fget if isinstance(v, property) else v).__doc__]
    assert not bare, f"{cls.__name__}: no docstring on {bare}"


def test_a_member_added_without_a_line_on_the_page_is_reported():
    class Grown(Client):
        def resubmit(self, job_id: str) -> str:
            """Not on the page."""
            return job_id

    assert public_members(Grown) == {"resubmit", "url", "token", "max_package_mb"}  # and Client's own __init__'s
    assert undocumented(Grown, "Client", PAGE.read_text()) == ["resubmit"]
    assert {"prepare", "batches", "report", "epoch", "step", "dp_world"} <= public_members(TrainContext)
