"""`google.api.http` path templates: parse once, match request paths.

The grammar (google/api/http.proto)::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

`{x}` is `{x=*}`.  `*` matches one non-empty path segment, `**` any number of
segments (only last, before the verb).  A variable's value is what its
segments matched: a one-segment variable is percent-decoded whole (`%2F`
becomes `/`); a multi-segment one is decoded except for `%2F`, so the slashes
that separate its segments stay distinguishable from encoded ones.

Matching works on the raw (still percent-encoded) path, split at `/`, so an
encoded slash never splits a segment.  Literals compare with the decoded
segment.  The verb is the text after the last `:` of the last segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["PathTemplate", "TemplateError", "Variable"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL = re.compile(r"[^/{}*:=]+")  # unreserved and sub-delims, as the template grammar allows

# Segment kinds in a compiled template.
_LITERAL_SEGMENT, _ONE, _MANY = 0, 1, 2


class TemplateError(ValueError):
    """A path template that does not follow the grammar; the message says where."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A field set from the path: segments [start, end) of the template (end -1: to the end)."""

    field_path: tuple[str, ...]
    start: int
    end: int

    @property
    def name(self) -> str:
        return ".".join(self.field_path)


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled template: segment kinds and literals, variables, verb."""

    source: str
    kinds: tuple[int, ...]
    literals: tuple[str, ...]  # the text of literal segments ("" for wildcards)
    variables: tuple[Variable, ...]
    verb: str

    @classmethod
    def parse(cls, source: str) -> PathTemplate:
        return _Parser(source).template()

    @property
    def deep(self) -> bool:
        """Whether the template ends in `**` (matches any number of segments)."""
        return bool(self.kinds) and self.kinds[-1] == _MANY

    @property
    def literal_count(self) -> int:
        return sum(1 for k in self.kinds if k == _LITERAL_SEGMENT)

    def match(self, segments: list[str], verb: str | None) -> dict[str, str] | None:
        """Variables by field path when `segments` (raw, split at "/") and `verb` fit."""
        if (verb or "") != self.verb:
            return None
        kinds, count = self.kinds, len(segments)
        if self.deep:
            if count < len(kinds) - 1:
                return None
        elif count != len(kinds):
            return None
        literals = self.literals
        for i, kind in enumerate(kinds):
            if kind == _MANY:
                break
            segment = segments[i]
            if kind == _LITERAL_SEGMENT:
                if segment != literals[i] and unquote(segment) != literals[i]:
                    return None
            elif not segment:
                return None
        values: dict[str, str] = {}
        for variable in self.variables:
            end = count if variable.end < 0 else variable.end
            if end - variable.start == 1 and kinds[variable.start] != _MANY:
                values[variable.name] = unquote(segments[variable.start])
            else:
                values[variable.name] = "/".join(
                    _decode_keeping_slash(s) for s in segments[variable.start : end]
                )
        return values

    def openapi_path(self) -> tuple[str, list[tuple[str, Variable, str]]]:
        """The path as OpenAPI writes it, and its parameters: (name, variable, kind).

        A one-segment variable keeps its field path (dots as `_`); the wildcards of
        a `name=shelves/*/books/*` variable become one parameter each, named after
        the literal before them (`/v1/shelves/{shelf}/books/{book}`), since an
        OpenAPI path parameter cannot hold a slash.  kind: "field", "segment", "rest".
        """
        parts: list[str] = []
        params: list[tuple[str, Variable, str]] = []
        owner = {i: v for v in self.variables for i in range(v.start, self._end(v))}
        taken: set[str] = set()
        for i, kind in enumerate(self.kinds):
            variable = owner.get(i)
            if kind == _LITERAL_SEGMENT:
                parts.append(self.literals[i])
                continue
            if variable is None:  # a bare wildcard outside any variable
                name, role = f"segment_{i}", "segment"
            elif self._end(variable) - variable.start == 1 and kind == _ONE:
                name, role = variable.name.replace(".", "_"), "field"
            else:
                before = self.literals[i - 1] if i and self.kinds[i - 1] == _LITERAL_SEGMENT else ""
                name = _singular(before) if before else variable.name.replace(".", "_")
                role = "rest" if kind == _MANY else "segment"
            while name in taken:
                name += "_"
            taken.add(name)
            params.append((name, variable, role) if variable else (name, _NO_VARIABLE, role))
            parts.append("{" + name + "}")
        path = "/" + "/".join(parts)
        return (f"{path}:{self.verb}" if self.verb else path), params

    def _end(self, variable: Variable) -> int:
        return len(self.kinds) if variable.end < 0 else variable.end


_NO_VARIABLE = Variable(("",), 0, 0)


def _singular(word: str) -> str:
    """`shelves` -> `shelf`, `categories` -> `category`, `books` -> `book` (parameter names)."""
    for plural, single in (("ies", "y"), ("ves", "f"), ("sses", "ss"), ("s", "")):
        if word.endswith(plural) and len(word) > len(plural):
            return word[: -len(plural)] + single
    return f"{word}_id"


def _decode_keeping_slash(segment: str) -> str:
    if "%" not in segment:
        return segment
    return "%2F".join(unquote(part) for part in re.split("%2[Ff]", segment))


class _Parser:
    """Recursive descent over the template grammar."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0
        self.kinds: list[int] = []
        self.literals: list[str] = []
        self.variables: list[Variable] = []

    def fail(self, what: str) -> TemplateError:
        return TemplateError(f"path template {self.source!r}: {what} at offset {self.pos}")

    def peek(self) -> str:
        return self.source[self.pos] if self.pos < len(self.source) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(f"expected {char!r}")
        self.pos += 1

    def template(self) -> PathTemplate:
        self.expect("/")
        self.segments(in_variable=False)
        verb = ""
        if self.peek() == ":":
            self.pos += 1
            match = _LITERAL.match(self.source, self.pos)
            if match is None:
                raise self.fail("expected a verb after ':'")
            verb = match.group(0)
            self.pos = match.end()
        if self.pos != len(self.source):
            raise self.fail("unexpected text")
        if _MANY in self.kinds[:-1]:
            raise TemplateError(f"path template {self.source!r}: '**' must be the last segment")
        names = [v.name for v in self.variables]
        if len(set(names)) != len(names):
            raise TemplateError(f"path template {self.source!r}: a field is bound twice")
        return PathTemplate(
            self.source, tuple(self.kinds), tuple(self.literals), tuple(self.variables), verb
        )

    def segments(self, *, in_variable: bool) -> None:
        self.segment(in_variable=in_variable)
        while self.peek() == "/":
            self.pos += 1
            self.segment(in_variable=in_variable)

    def segment(self, *, in_variable: bool) -> None:
        if self.source.startswith("**", self.pos):
            self.pos += 2
            self._add(_MANY, "")
        elif self.peek() == "*":
            self.pos += 1
            self._add(_ONE, "")
        elif self.peek() == "{":
            if in_variable:
                raise self.fail("variables cannot nest")
            self.variable()
        else:
            match = _LITERAL.match(self.source, self.pos)
            if match is None:
                raise self.fail("expected a segment")
            self.pos = match.end()
            self._add(_LITERAL_SEGMENT, match.group(0))

    def _add(self, kind: int, literal: str) -> None:
        self.kinds.append(kind)
        self.literals.append(literal)

    def variable(self) -> None:
        self.expect("{")
        path: list[str] = []
        while True:
            match = _IDENT.match(self.source, self.pos)
            if match is None:
                raise self.fail("expected a field name")
            path.append(match.group(0))
            self.pos = match.end()
            if self.peek() != ".":
                break
            self.pos += 1
        start = len(self.kinds)
        if self.peek() == "=":
            self.pos += 1
            self.segments(in_variable=True)
        else:
            self._add(_ONE, "")
        self.expect("}")
        end = -1 if self.kinds[-1] == _MANY else len(self.kinds)
        self.variables.append(Variable(tuple(path), start, end))
