"""Safe YAML for policy files, built straight from libyaml's events: linear, bounded, and lean.

Why not ``yaml.safe_load``: its composer makes a node object, with two marks, for every scalar,
resolves each scalar's tag through Python regular expressions, and only then constructs the Python
values from the nodes; the loader composed the file a second time to map errors to lines. A 5 MB
policy took 58 s and 691 MB that way. Here the values are built in one pass over the event stream
(libyaml's C parser when PyYAML has it), each distinct plain scalar is resolved once, and nothing is
kept per node. Line numbers are found only when there is an error to place (:func:`lines_of`, a
second pass that keeps one path, not a tree).

It gives what ``yaml.safe_load`` gives for everything a policy can contain (the YAML 1.1 scalars
that PyYAML's resolver knows, explicit standard tags, anchors, aliases and ``<<`` merge keys), and
refuses, as a ``yaml.MarkedYAMLError`` with the place, what no policy needs and a hostile file
could use against the validator:

- nesting deeper than :data:`MAX_DEPTH` levels (a policy needs six);
- aliases that expand to more than :data:`MAX_ALIAS_NODES` nodes, or four times what the file
  itself holds ("billion laughs": a few KiB of anchors that validate as a billion nodes);
- an alias inside the node it names (a cycle);
- tags other than YAML's standard scalar ones, ``!!map`` and ``!!seq`` (``safe_load`` refuses
  unknown tags too; ``!!set``, ``!!omap`` and ``!!pairs`` it would build, but no policy field takes them).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences accepted."""
MAX_ALIAS_NODES = 1_000_000
"""Nodes that aliases may add to the document (each alias counts the whole node it names); more is
allowed only up to four times the nodes written in the file."""

_TAG = "tag:yaml.org,2002:"
_MAP, _SEQ, _STR, _MERGE, _VALUE = (_TAG + t for t in ("map", "seq", "str", "merge", "value"))
_SPECIAL_KEYS = (_MERGE, _VALUE)
_SCALAR_TAGS = {_TAG + t for t in ("null", "bool", "int", "float", "binary", "timestamp", "str")}
_RESOLVER = Resolver()
_CONSTRUCTOR = SafeConstructor()

Loc = tuple[int | str, ...]


def _parser(text: str) -> Any:
    """An event source over ``text``: libyaml's parser when PyYAML was built with it."""
    if getattr(yaml, "__with_libyaml__", False):
        return yaml.CSafeLoader(text)
    return yaml.SafeLoader(text)


def _events(text: str) -> Iterable[Event]:
    parser = _parser(text)
    try:
        while True:
            event = parser.get_event()
            yield event
            if type(event) is StreamEndEvent:
                return
    finally:
        parser.dispose()


def _error(problem: str, mark: Any, context: str | None = None, context_mark: Any = None) -> ConstructorError:
    return ConstructorError(context, context_mark, problem, mark)


def _duplicate(key: Any, mark: Any, mapping_mark: Any) -> ConstructorError:
    """A key given twice in one mapping: PyYAML keeps the last silently, so a policy's ``rto: 10s``
    followed by ``rto: 20s`` would read as 20 s with no word. A mistake either way: refused."""
    return _error(f"found duplicate key {str(key)[:64]!r}", mark, "while constructing a mapping", mapping_mark)


class _Frame:
    """A mapping or sequence being read."""

    __slots__ = ("anchor", "has_key", "is_map", "items", "key", "key_mark", "mark", "merges", "nodes", "own")

    def __init__(self, is_map: bool, anchor: str | None, mark: Any) -> None:
        self.is_map = is_map
        self.anchor = anchor
        self.mark = mark
        self.items: list[Any] = []
        self.own: dict[Any, Any] = {}
        self.merges: list[dict[Any, Any]] = []
        self.key: Any = None
        self.key_mark: Any = None
        self.has_key = False
        self.nodes = 1


class _Builder:
    def __init__(self) -> None:
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        """Anchor → (its value, its node count); only nodes already complete."""
        self.open_anchors: set[str] = set()
        self.plain: dict[str, tuple[str, Any]] = {}
        """Plain scalar text → (tag, value): most scalars of a policy repeat (keys, small numbers)."""
        self.physical = 0
        self.aliased = 0
        self.root: Any = None
        self.documents = 0

    # scalars

    def scalar(self, event: ScalarEvent) -> tuple[str, Any]:
        tag = event.tag
        value = event.value
        if tag is None or tag == "!":
            if not event.implicit[0]:  # quoted, or a block scalar: always a string
                return _STR, value
            cached = self.plain.get(value)
            if cached is None:
                tag = _RESOLVER.resolve(ScalarNode, value, event.implicit)  # type: ignore[no-untyped-call]
                cached = (tag, value if tag == _STR else self._construct(tag, event))
                self.plain[value] = cached
            return cached
        if tag not in _SCALAR_TAGS:
            raise _error(f"could not determine a constructor for the tag {tag!r}", event.start_mark)
        return tag, self._construct(tag, event)

    @staticmethod
    def _construct(tag: str, event: ScalarEvent) -> Any:
        if tag in (_MERGE, _VALUE):
            return event.value  # only meaningful as a mapping key; checked where it is used
        construct: Callable[[SafeConstructor, ScalarNode], Any] = SafeConstructor.yaml_constructors[tag]
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return construct(_CONSTRUCTOR, node)
        except ValueError as exc:  # a number of more than 4,300 digits (Python's limit on int parsing)
            raise _error(f"cannot read this value: {str(exc).split(';')[0]}", event.start_mark) from None

    # the tree

    def add(self, value: Any, nodes: int, mark: Any, tag: str | None = None) -> None:
        """Put a finished value in the container being read (or make it the document)."""
        if not self.stack:
            self.root = value
            return
        top = self.stack[-1]
        top.nodes += nodes
        if not top.is_map:
            top.items.append(value)
            return
        if not top.has_key:
            if tag == _VALUE:
                value = "="
            elif tag == _MERGE:
                value = _MergeKey
            elif type(value) is not str and not isinstance(value, Hashable):
                raise _error("found unhashable key", mark, "while constructing a mapping", top.mark)
            elif value in top.own:
                raise _duplicate(value, mark, top.mark)
            top.key, top.key_mark, top.has_key = value, mark, True
            return
        top.has_key = False
        if tag in (_MERGE, _VALUE):
            raise _error(f"could not determine a constructor for the tag {tag!r}", mark)
        if top.key is _MergeKey:
            self.merge(top, value, mark)
        else:
            top.own[top.key] = value

    def merge(self, top: _Frame, value: Any, mark: Any) -> None:
        if isinstance(value, dict):
            top.merges.append(value)
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            top.merges.extend(reversed(value))  # the first mapping listed wins, as in PyYAML
        else:
            what = "a list with something else" if isinstance(value, list) else type(value).__name__
            raise _error(
                f"expected a mapping or list of mappings for merging, but found {what}",
                mark,
                "while constructing a mapping",
                top.mark,
            )

    def open(self, is_map: bool, event: MappingStartEvent | SequenceStartEvent) -> None:
        tag = event.tag
        default = _MAP if is_map else _SEQ
        if tag not in (None, "!", default):
            raise _error(f"could not determine a constructor for the tag {tag!r}", event.start_mark)
        if len(self.stack) >= MAX_DEPTH:
            raise _error(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self.physical += 1
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        self.stack.append(_Frame(is_map, event.anchor, event.start_mark))

    def close(self) -> None:
        frame = self.stack.pop()
        value: Any
        if not frame.is_map:
            value = frame.items
        elif frame.merges:
            value = {}
            for merged in frame.merges:
                value.update(merged)
            value.update(frame.own)
        else:
            value = frame.own
        if frame.anchor is not None:
            self.open_anchors.discard(frame.anchor)
            self.anchors[frame.anchor] = (value, frame.nodes)
        self.add(value, frame.nodes, frame.mark)

    def alias(self, event: AliasEvent) -> None:
        name = event.anchor
        if name in self.open_anchors:
            raise _error(f"alias *{name} is inside the node it names (a cycle)", event.start_mark)
        if name not in self.anchors:
            raise _error(f"found undefined alias {name!r}", event.start_mark)
        value, nodes = self.anchors[name]
        self.aliased += nodes
        if self.aliased > max(MAX_ALIAS_NODES, 4 * self.physical):
            raise _error(
                f"aliases expand to more than {max(MAX_ALIAS_NODES, 4 * self.physical):,} nodes "
                "(a policy needs nowhere near that many; is this a 'billion laughs' file?)",
                event.start_mark,
            )
        self.add(value, nodes, event.start_mark)


class _MergeKey:
    """Marks a ``<<`` key while its value is read."""


def load(text: str) -> Any:
    """The single YAML document in ``text`` as Python values (None when empty), like
    ``yaml.safe_load``; raises ``yaml.YAMLError`` with the place of the problem."""
    builder = _Builder()
    plain = builder.plain
    stack = builder.stack
    parser = _parser(text)
    get_event = parser.get_event
    try:
        while True:
            event = get_event()
            kind = type(event)
            if kind is ScalarEvent:
                builder.physical += 1
                # The common case inline: a plain scalar seen before (a key, a small number, a
                # name of a kind), into the container being read.
                if event.tag is None and event.anchor is None and event.implicit[0] and stack:
                    cached = plain.get(event.value)
                    if cached is not None and cached[0] not in _SPECIAL_KEYS:
                        top = stack[-1]
                        top.nodes += 1
                        if not top.is_map:
                            top.items.append(cached[1])
                        elif not top.has_key:
                            if cached[1] in top.own:
                                raise _duplicate(cached[1], event.start_mark, top.mark)
                            top.key, top.key_mark, top.has_key = cached[1], event.start_mark, True
                        elif top.key is _MergeKey:
                            top.has_key = False
                            builder.merge(top, cached[1], event.start_mark)
                        else:
                            top.has_key = False
                            top.own[top.key] = cached[1]
                        continue
                tag, value = builder.scalar(event)
                if event.anchor is not None:
                    builder.anchors[event.anchor] = (value, 1)
                builder.add(value, 1, event.start_mark, tag)
            elif kind is MappingStartEvent:
                builder.open(True, event)
            elif kind is SequenceStartEvent:
                builder.open(False, event)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                builder.close()
            elif kind is AliasEvent:
                builder.alias(event)
            elif kind is DocumentStartEvent:
                builder.documents += 1
                if builder.documents > 1:
                    raise _error(
                        "expected a single document in the stream, but found another document", event.start_mark
                    )
                builder.anchors.clear()
            elif kind is StreamEndEvent:
                return builder.root
    finally:
        parser.dispose()


def lines_of(text: str, locs: Iterable[Loc]) -> dict[Loc, int | None]:
    """The line (1-based) of each ``loc`` (a path of keys and indexes, as pydantic reports errors):
    the line where its value starts; for a key the mapping lacks, the mapping's line; when the path
    leaves the document, the line of the deepest node it reaches.

    One pass over the events, keeping the current path only: cheap enough for a file of any size,
    and run only when there are errors to place."""
    wanted = list(locs)
    prefixes = {loc[:i] for loc in wanted for i in range(len(loc) + 1)}
    found: dict[Loc, int] = {}
    # Each frame: [is_map, path (None inside a complex key), next index, expecting a key, the key].
    stack: list[list[Any]] = []
    try:
        for event in _events(text):
            kind = type(event)
            if kind is MappingEndEvent or kind is SequenceEndEvent:
                stack.pop()
                continue
            if kind not in (ScalarEvent, MappingStartEvent, SequenceStartEvent, AliasEvent):
                continue
            path: Loc | None
            if not stack:
                path = ()
            else:
                top = stack[-1]
                if top[0] and top[3]:  # a mapping key: remember it, it is no value of its own
                    top[3] = False
                    top[4] = event.value if isinstance(event, ScalarEvent) else None
                    if kind is MappingStartEvent or kind is SequenceStartEvent:
                        stack.append([kind is MappingStartEvent, None, 0, True, None])
                    continue
                if top[1] is None:
                    path = None
                elif top[0]:
                    path = None if top[4] is None else (*top[1], top[4])
                else:
                    path = (*top[1], top[2])
                if top[0]:
                    top[3] = True
                else:
                    top[2] += 1
            if path is not None and path in prefixes:
                found[path] = event.start_mark.line + 1
            if kind is MappingStartEvent or kind is SequenceStartEvent:
                stack.append([kind is MappingStartEvent, path, 0, True, None])
    except yaml.YAMLError:
        pass  # the file loaded before; whatever was found stays good
    result: dict[Loc, int | None] = {}
    for loc in wanted:
        result[loc] = next((found[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in found), None)
    return result
