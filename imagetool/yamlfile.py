"""Reading the YAML files the tool is given (release files, inventories): one loader, one way of
saying what is wrong with them.

`yaml.safe_load` semantics, except that a mapping key written twice is an error: plain YAML keeps
the last one silently, which would make two nodes or two settings with the same name collapse
into one without a word. Every error names the file, the line and column, and the problem.

Files are read with a size limit (`read_limited`) and a document may expand to at most
MAX_NODES values with its aliases followed: a few hundred bytes of nested aliases ("billion
laughs") would otherwise become gigabytes in any code that walks, copies or prints the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imagetool.errors import ImagetoolError, InputError, NotFoundError

# Release files and inventories are hand-written: a few KiB. 4 MiB leaves room for a fleet of
# thousands of nodes and still refuses /dev/zero or a mistyped path to an image at once.
MAX_YAML_BYTES = 4 << 20
# Values in a document with every alias expanded; a large inventory has a few tens of thousands.
MAX_NODES = 200_000


class Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and documents that aliases blow up (subclassed
    where a format adds tags of its own, as Ansible's `!vault`)."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose value, aliases expanded, has more than MAX_NODES parts (or refers to
    itself). Counted without expanding: each node's expanded size is computed once."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the value that contains it",
                                              node.start_mark)
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand this document to more than {MAX_NODES} values", node.start_mark)
        busy.discard(key)
        sizes[key] = total
        return total

    size(root)


def _construct_mapping(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
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


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


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


def parse_yaml(text: str | bytes, where: str, loader: type[Loader] = Loader) -> Any:
    """The document in `text`; InputError naming `where`, the line and the problem if malformed."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise yaml_error(where, e) from None
    except RecursionError:  # PyYAML parses nested collections recursively
        raise InputError(f"{where}: malformed YAML: nested too deeply") from None


def read_limited(path: str | Path, what: str, limit: int, *, kind: str = "",
                 error: type[ImagetoolError] = InputError) -> bytes:
    """The bytes of the file `path`, at most `limit` of them: a device, a FIFO or a huge file given
    by mistake is refused with a clear error (`error`) instead of filling memory."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: {what} does not exist") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {what}{f' ({kind})' if kind else ''}") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path}: too large for {what} (more than {limit // 1024} KiB)")
    return data


def load_yaml(path: str | Path, what: str) -> Any:
    """Read and parse the YAML file `path`; `what` names it in errors ("release file")."""
    return parse_yaml(read_limited(path, what, MAX_YAML_BYTES, kind="YAML"), str(path))
