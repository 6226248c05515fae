"""Reading the YAML files the tool is given (release files, inventories): one loader, one way of
saying what is wrong with them.

`yaml.safe_load` semantics, except that a mapping key written twice is an error: plain YAML keeps
the last one silently, which would make two nodes or two settings with the same name collapse
into one without a word. Every error names the file, the line and column, and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imagetool.errors import InputError, NotFoundError


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        # Keys merged in with `<<:` may be overridden; only keys written here must be unique.
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key; construct_mapping below reports it properly
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"found duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def yaml_error(where: str, e: yaml.YAMLError) -> InputError:
    """`where: malformed YAML at line L, column C: problem`, naming the opening mark too when it
    is elsewhere ("unexpected end of stream" alone points at the end; the opening quote is what
    to fix)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return InputError(f"{where}: malformed YAML: {e}")
    mark = e.problem_mark or e.context_mark
    loc = f" at {_at(mark)}" if mark is not None else ""
    problem = e.problem or e.context or "syntax error"
    ctx = e.context_mark
    if e.context and e.problem:
        if ctx is not None and mark is not None and (ctx.line, ctx.column) != (mark.line, mark.column):
            problem += f" ({e.context} at {_at(ctx)})"
        else:
            problem = f"{e.context} {problem}"
    return InputError(f"{where}: malformed YAML{loc}: {problem}")


def parse_yaml(text: str | bytes, where: str) -> Any:
    """The document in `text`; InputError naming `where`, the line and the problem if malformed."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise yaml_error(where, e) from None


def load_yaml(path: str | Path, what: str) -> Any:
    """Read and parse the YAML file `path`; `what` names it in errors ("release file")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: {what} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a {what} (YAML)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    return parse_yaml(data, str(path))
