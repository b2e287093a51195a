"""MkDocs hooks: pages made from the repository at build time, so that each fact has one copy.

- ``results/<study>/…``: every study's ``experiments/results/<study>/findings.md`` and its figures, each study a
  page under "Results" in the navigation and linked from the results page (new studies appear when their results
  are committed);
- ``api/config.md``: the run config's keys, types, defaults and comments, read from ``ntkcv/config.py``.
"""

from __future__ import annotations

import ast
import io
import pathlib
import tokenize
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = pathlib.Path("experiments/results")
CONFIG_SOURCE = pathlib.Path("ntkcv/config.py")


def _root(config: Any) -> pathlib.Path:
    return pathlib.Path(config.config_file_path).resolve().parent


def _studies(config: Any) -> list[pathlib.Path]:
    return sorted(path.parent for path in (_root(config) / RESULTS).glob("*/findings.md"))


def on_config(config: Any) -> Any:
    """Turn the nav's ``results.md`` entry into a section: the results page, then one page per study."""
    studies = [{study.name: f"results/{study.name}/findings.md"} for study in _studies(config)]
    for index, entry in enumerate(config.nav or []):
        if isinstance(entry, dict) and entry.get("Results") == "results.md":
            config.nav[index] = {"Results": [{"Overview": "results.md"}, *studies]}
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """End the results page with a link to each study's findings."""
    if page.file.src_uri != "results.md":
        return markdown
    links = [f"- [{study.name}](results/{study.name}/findings.md)" for study in _studies(config)]
    return "\n".join([markdown.rstrip(), "", "## Findings per study", "", *links, ""])


def on_files(files: Files, config: Any) -> Files:
    root = _root(config)
    for study in _studies(config):
        for path in sorted(study.rglob("*")):
            if path.is_file():
                uri = f"results/{path.relative_to(root / RESULTS).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    files.append(File.generated(config, "api/config.md", content=config_reference(root / CONFIG_SOURCE)))
    return files


def config_reference(source_path: pathlib.Path) -> str:
    """Markdown tables of the sections of ``RunConfig``: each key with its type, default and comment."""
    source = source_path.read_text()
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    comments = _comments(source)
    lines = [
        "# Config reference",
        "",
        "Every key of a run config (`ntkcv train CONFIG`, `--set SECTION.KEY=VALUE`, a sweep's `base` and `grid`), "
        "read from `ntkcv/config.py` when the docs are built. Every key is optional; an unknown key or a value "
        "outside the allowed ones is an error naming the key. `configs/default.yaml` is the default run:",
        "",
        '```yaml\n--8<-- "configs/default.yaml"\n```',
    ]
    for section, class_name in _fields(classes["RunConfig"]):
        lines += ["", f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, annotation, default, line in _fields(classes[class_name], with_details=True):
            meaning = " ".join(comments.get(number, "") for number in _comment_lines(comments, line)).strip()
            lines.append(f"| `{section}.{name}` | {annotation} | `{default}` | {meaning.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def _fields(node: ast.ClassDef, *, with_details: bool = False) -> list[tuple]:
    fields = []
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            if not with_details:
                fields.append((statement.target.id, ast.unparse(statement.annotation)))
                continue
            default = ast.unparse(statement.value) if statement.value is not None else ""
            fields.append((statement.target.id, _describe(statement.annotation), default, statement.lineno))
    return fields


def _describe(annotation: ast.expr) -> str:
    """A type for a table cell: ``Literal`` as its allowed values, unions joined by "or"."""
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return f"{_describe(annotation.left)} or {_describe(annotation.right)}"
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Literal":
        values = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return ", ".join(f"`{ast.literal_eval(value)!r}`" for value in values)
    return f"`{ast.unparse(annotation)}`"


def _comments(source: str) -> dict[int, str]:
    """``{line: comment}``; whole-line comments are stored under the negated line number."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            whole_line = token.line.strip().startswith("#")
            comments[-token.start[0] if whole_line else token.start[0]] = token.string.lstrip("#").strip()
    return comments


def _comment_lines(comments: dict[int, str], line: int) -> list[int]:
    """The keys of ``comments`` that describe the field on ``line``: the comment block above it, then its own."""
    above = []
    while -(line - len(above) - 1) in comments:
        above.append(-(line - len(above) - 1))
    return [*reversed(above), line]
