"""Loading documents nobody has checked yet: the one place YAML and JSON from outside are parsed.

Specs (a file for ``shipyard run``, a REST body for the server), client config files and
``--set`` values all come through here. Each loader bounds the work *before* the document
reaches pydantic or the store:

- size: the caller bounds the bytes (the API's body limit; :data:`MAX_DOCUMENT_BYTES` for files);
- YAML aliases: an anchor may be referenced, but the document with every alias expanded may have
  at most :data:`MAX_NODES` nodes (a few hundred bytes of nested aliases otherwise expand to
  millions: the "billion laughs" document), and a recursive alias is refused;
- depth: at most :data:`MAX_DEPTH` nested mappings/sequences (deeper JSON makes the decoder raise
  ``RecursionError``, which would be a 500);
- strings: no NUL bytes anywhere, keys and values at most :data:`MAX_STRING` characters.

Errors are :class:`~shipyard.errors.SpecError` with one line naming the source, the place and the
limit, so the CLI exits 2 and the API answers 4xx.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from shipyard.errors import SpecError

MAX_DOCUMENT_BYTES = 1 << 20
MAX_NODES = 20_000
MAX_DEPTH = 32
MAX_STRING = 65_536

class UnparsableDocument(SpecError):
    """Not YAML/JSON at all (the API answers 400; a document over a limit is 422)."""


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: 10-50x faster


def _expanded_size(root: yaml.Node, source: str) -> None:
    """Refuse a composed YAML graph that is too deep, recursive, or too large once aliases are
    expanded. Aliases are shared node objects, so sizes are memoised per node: the check costs
    one visit per distinct node even for a document that would expand to billions."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise SpecError(f"{source}: a YAML alias refers to a node that contains it (recursive document)")
        if depth > MAX_DEPTH:
            raise SpecError(f"{source}: nested deeper than {MAX_DEPTH} levels")
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v, depth + 1) for v in node.value)
        else:
            n = 1
            if len(node.value) > MAX_STRING:
                raise SpecError(f"{source}: a string of {len(node.value)} characters; at most {MAX_STRING}")
        on_path.discard(key)
        sizes[key] = n
        if n > MAX_NODES:
            raise SpecError(f"{source}: more than {MAX_NODES} values once YAML aliases are expanded")
        return n

    size(root, 0)


def load_yaml(text: str | bytes, source: str) -> Any:
    """A YAML document as plain Python values, within the limits above."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if "\x00" in text:
        raise SpecError(f"{source}: contains a NUL byte")
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _expanded_size(root, source)
        value = loader.construct_document(root)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise UnparsableDocument(f"{source}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
    check_tree(value, source)
    return value


def load_json(text: str | bytes, source: str, max_nodes: int = MAX_NODES) -> Any:
    """A JSON document as plain Python values, within the limits above (``max_nodes``: a larger
    budget for a driver's report, which carries up to 100,000 metric points)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise SpecError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UnparsableDocument(f"{source}: not valid JSON: {e}") from None
    check_tree(value, source, max_nodes)
    return value


def check_tree(value: Any, source: str, max_nodes: int = MAX_NODES) -> None:
    """Depth, node count, string length, NUL bytes and finite numbers of an already parsed tree
    (YAML's ``.inf``/``.nan`` and JSON's ``Infinity``/``NaN`` are refused here, whatever field
    they are in)."""
    count = 0
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        count += 1
        if count > max_nodes:
            raise SpecError(f"{source}: more than {max_nodes} values")
        if depth > MAX_DEPTH:
            raise SpecError(f"{source}: {path or '(top level)'}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(k, str):
                    _check_string(k, source, f"{path}.{k[:40]}".lstrip("."), "a key")
                elif not isinstance(k, (int, float, bool)) and k is not None:
                    raise SpecError(f"{source}: {path or '(top level)'}: a key that is a YAML {type(k).__name__}")
                stack.append((v, depth + 1, f"{path}.{k}".lstrip(".") if isinstance(k, str) else path))
        elif isinstance(node, list):
            stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, str):
            _check_string(node, source, path, "the value")
        elif isinstance(node, float) and (node != node or node in (float("inf"), float("-inf"))):
            raise SpecError(f"{source}: {path or '(top level)'}: got {node}; numbers must be finite")
        elif not isinstance(node, (int, float, bool)) and node is not None:
            # YAML's !!binary, !!set, !!timestamp, !!omap...: nothing JSON could have said
            raise SpecError(f"{source}: {path or '(top level)'}: a YAML {type(node).__name__}; only mappings, "
                            "lists, strings, numbers, booleans and null are accepted")


def _check_string(s: str, source: str, path: str, what: str) -> None:
    if len(s) > MAX_STRING:
        raise SpecError(f"{source}: {path or '(top level)'}: {what} has {len(s)} characters; at most {MAX_STRING}")
    if "\x00" in s:
        raise SpecError(f"{source}: {path or '(top level)'}: {what} contains a NUL byte")
