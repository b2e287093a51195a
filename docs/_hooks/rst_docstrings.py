"""A griffe extension for the docs: ntkcv's docstrings use Google sections with reStructuredText markup, which
mkdocstrings would print verbatim. This rewrites that markup as the Markdown the site's extensions render:

- ``.. math::`` blocks become ``$$ … $$`` and ``:math:`x``` becomes ``$x$`` (pymdownx.arithmatex, MathJax);
- ``:func:`~ntkcv.cv.entropy``` and the other Python roles become cross-references, resolved in the scope of the
  documented object, that stay plain code where the target is not in the docs (autorefs' optional references);
- double-backtick literals become Markdown code, and a paragraph ending in ``::`` ends in ``:`` (the indented
  block after it is a Markdown code block already);
- a module attribute documented by ``#:`` comments above it (as Sphinx reads them) gets them as its docstring;
- an argument entry for several parameters (``trace_axes, implementation: as for …``) becomes one entry each, so
  that griffe still checks every documented name against the signature.
"""

from __future__ import annotations

import html
import re
import textwrap
from typing import Any

import griffe

_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?:(?P=indent)[ \t]+.*)?\n)+)", re.M)
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|obj|exc|const):`(?P<target>[^`]+)`")
_LITERAL = re.compile(r"``(?P<code>[^`]+?)``")
_LITERAL_BLOCK = re.compile(r"(?<=\S)::\n\n")
_ARGS_SECTION = re.compile(
    r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters):[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+.*\n?)+)", re.M)
_GROUPED_ENTRY = re.compile(r"(?P<first>\w+)(?P<others>(?:, \w+)+):(?P<text>.*)")


def rst_to_markdown(text: str, resolve: Any = None) -> str:
    """The docstring ``text`` with its reStructuredText markup in Markdown; ``resolve(name)`` qualifies a name."""
    text = _ARGS_SECTION.sub(_split_grouped_entries, text)
    text = _MATH_BLOCK.sub(_math_block, text)
    text = _ROLE.sub(lambda match: _reference(match["target"], resolve), text)
    text = _LITERAL.sub(lambda match: f"`{match['code']}`", text)
    text = _LITERAL_BLOCK.sub(":\n\n", text)
    return _MATH_ROLE.sub(lambda match: f"${match['tex'].strip()}$", text)


def _split_grouped_entries(section: re.Match) -> str:
    """``a, b: text`` as ``a: text`` then ``b: as a.`` (griffe's Google parser takes one name per entry)."""
    lines = section[0].splitlines(keepends=True)
    body = lines[1:]
    indent = body[0][: len(body[0]) - len(body[0].lstrip())]
    result, pending = [lines[0]], []
    for line in body:
        entry = line.startswith(indent) and not line[len(indent)].isspace()
        if entry:
            result += pending
            pending = []
        grouped = _GROUPED_ENTRY.fullmatch(line.strip()) if entry else None
        if grouped:
            first = grouped["first"]
            line = f"{indent}{first}:{grouped['text']}\n"
            pending = [f"{indent}{name}: as ``{first}``.\n" for name in grouped["others"].split(", ")[1:]]
        result.append(line)
    return "".join(result + pending)


def _math_block(match: re.Match) -> str:
    indent = match["indent"]
    body = textwrap.dedent(match["body"]).strip("\n")
    return f"\n{indent}$$\n{textwrap.indent(body, indent)}\n{indent}$$\n\n"


def _reference(target: str, resolve: Any) -> str:
    title, _, explicit = target.partition(" <")
    if explicit:  # :func:`title <target>`
        target = explicit.rstrip(">")
    else:
        target = title.lstrip("~")
        title = target.rsplit(".", 1)[-1] if title.startswith("~") else target
    identifier = target
    if resolve is not None:
        try:
            identifier = resolve(target)
        except (griffe.NameResolutionError, KeyError, ValueError):
            pass
    return f'<autoref identifier="{html.escape(identifier)}" optional hover><code>{html.escape(title)}</code></autoref>'


def _resolver(obj: griffe.Object) -> Any:
    """``obj.resolve`` for a dotted name: its first part in ``obj``'s scope, the rest as attributes."""
    def resolve(name: str) -> str:
        head, _, rest = name.partition(".")
        if head in ("ntkcv", "jax", "numpy", "optax", "flax"):
            return name
        path = obj.resolve(head)
        return f"{path}.{rest}" if rest else path

    return resolve


def _comment_docstring(obj: griffe.Object) -> griffe.Docstring | None:
    """The ``#:`` comment lines right above ``obj``'s definition, as its docstring."""
    lines = obj.lines_collection[obj.filepath]
    first = obj.lineno - 1  # 0-based index of the definition
    while first > 0 and lines[first - 1].lstrip().startswith("#:"):
        first -= 1
    comments = [line.lstrip()[2:].strip() for line in lines[first : obj.lineno - 1]]
    return griffe.Docstring("\n".join(comments), parent=obj) if comments else None


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring of a loaded package once its object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None and obj.is_attribute and obj.lineno is not None:
            obj.docstring = _comment_docstring(obj)
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, _resolver(obj))

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # on_object skips the package itself
