"""The docs are true to the code: docs/api.md's example runs, and every ``aoq`` command,
``section.key`` setting and ``make`` target that README.md and docs/*.md name exists."""

import dataclasses
import re
from pathlib import Path

import click
import torch
from click.testing import CliRunner

from stages.cli import cli
from stages.config.options import option_registry
from stages.config.sections import NAMED, SECTIONS, Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fenced block: its language and its text (fences of three or more backticks).
FENCE = re.compile(r"^[ \t]*(`{3,})([\w+-]*)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
# An inline code span (any run of backticks, closed by the same run; may wrap lines).
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
# `aoq <command> [<subcommand>]` where a shell command starts: a span's or line's start
# (after `$ `), or after `&&`, `||`, `;`, `|`, `$(`. The second word may list
# alternatives (`aoq features tsv|cnn|precomp`).
COMMAND = re.compile(r"(?:^|&&|\|\||;|\||\$\()[ \t]*(?:\$[ \t]+)?aoq[ \t]+([a-z][\w-]*)"
                     r"(?:[ \t]+([a-z][\w|-]*))?", re.M)
# `section.key`, not inside a path or a dotted name (stages/pipeline/train.py, x.train.y),
# not a call (loss.backward()); a file name (train.h5) is told apart by its extension.
SETTING = re.compile(r"(?<![\w./$-])(" + "|".join(SECTIONS) + r")\.([a-z_]\w*)\b"
                     r"(?![.(/-]\w|\()(?:=([\w.:/-]*))?")
FILE_EXTENSIONS = {"py", "md", "h5", "log", "json", "jsonl", "yaml", "yml", "pt", "txt",
                   "csv", "png", "npy", "onnx", "safetensors", "lock", "tsv"}
MAKE = re.compile(r"(?:^|&&|;)[ \t]*make[ \t]+([a-z][\w-]*)", re.M)


def markdown_blocks(path: Path) -> tuple[list[tuple[str, str, int]], str]:
    """The fenced blocks of ``path`` as ``(language, text, line)``, and the rest of its
    text (fences blanked, line numbers kept)."""
    text = path.read_text(encoding="utf-8")
    blocks = [(m.group(2), m.group(3), text.count("\n", 0, m.start(3)) + 1)
              for m in FENCE.finditer(text)]
    rest = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return blocks, rest


def doc_texts(prose: bool = False):
    """``(path, line, text)`` for every fenced block but the python ones (their names are
    variables, not commands or settings) of README.md and docs/*.md, then each inline code
    span or, with ``prose``, the whole text outside the fences (spans included)."""
    for path in DOCS:
        blocks, rest = markdown_blocks(path)
        name = path.relative_to(ROOT)
        for language, text, line in blocks:
            if language != "python":
                yield name, line, text
        if prose:
            yield name, 1, rest
            continue
        for m in SPAN.finditer(rest):
            yield name, rest.count("\n", 0, m.start()) + 1, m.group(2)


def matches(pattern: re.Pattern, prose: bool = False):
    """``("path:line", match)`` of ``pattern`` in :func:`doc_texts`."""
    for name, line, text in doc_texts(prose):
        for m in pattern.finditer(text):
            yield f"{name}:{line + text.count(chr(10), 0, m.start())}", m


def test_api_examples_run():
    fenced, _ = markdown_blocks(ROOT / "docs" / "api.md")
    blocks = [(text, line) for language, text, line in fenced if language == "python"]
    assert blocks, "docs/api.md has no ```python block"
    for text, line in blocks:
        assert "assert " in text, f"docs/api.md:{line}: the example checks nothing"
        # Padded so that a traceback names the line of docs/api.md.
        code = compile("\n" * (line - 1) + text, str(ROOT / "docs" / "api.md"), "exec")
        with torch.random.fork_rng(devices=[]):  # the example seeds torch: not for others
            exec(code, {"__name__": "docs_api_example"})  # a fresh namespace each


def documented_commands() -> dict[tuple[str, ...], str]:
    """Each command path shown (``("train",)``, ``("features", "cnn")``) and where first."""
    commands: dict[tuple[str, ...], str] = {}
    for where, m in matches(COMMAND):
        name, second = m.group(1), m.group(2)
        if isinstance(cli.commands.get(name), click.Group) and second:
            paths = [(name, sub) for sub in second.split("|")]
        else:
            paths = [(name,)]
        for path in paths:
            commands.setdefault(path, where)
    return commands


def test_documented_commands_exist():
    commands = documented_commands()
    assert len(commands) >= 15 and ("features", "cnn") in commands  # the parser works
    runner = CliRunner()
    wrong = []
    for path, where in sorted(commands.items()):
        result = runner.invoke(cli, [*path, "--help"])
        if result.exit_code != 0 or "Usage:" not in result.output:
            wrong.append(f"{where}: aoq {' '.join(path)} (exit {result.exit_code}: "
                         f"{result.output.strip().splitlines()[-1:]})")
    assert not wrong, "commands the docs show that aoq does not have:\n" + "\n".join(wrong)


def setting_known(section: str, key: str, value: str | None) -> bool:
    """Whether ``section.key`` is a setting: a field of a section, or for ``model``/``loss``
    ``name`` (its value, when given, a registered name) or an option of a registered class."""
    if section in NAMED:
        registry = option_registry(section)
        if key == "name":
            return not value or value in registry.names()
        return bool(registry.takers(key))
    return key in {f.name for f in dataclasses.fields(getattr(Config(), section))}


def test_documented_settings_exist():
    found, wrong = set(), []
    for where, m in matches(SETTING, prose=True):
        section, key, value = m.groups()
        if key in FILE_EXTENSIONS:
            continue
        found.add(f"{section}.{key}")
        if not setting_known(section, key, value):
            wrong.append(f"{where}: {m.group(0)}")
    assert {"loss.name", "train.lr", "offcandi.remine_every", "memory.size"} <= found
    assert not wrong, "settings the docs name that do not exist:\n" + "\n".join(wrong)


def makefile_targets() -> set[str]:
    """Explicit targets of the Makefile's rules (``name ... :``, not ``:=`` assignments)."""
    targets = set()
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.-][^:=#\t]*?)\s*::?(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return targets


def test_documented_make_targets_exist():
    targets = makefile_targets()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Makefile targets", 1)[1].split("\n## ", 1)[0]
    in_table = {t for row in re.findall(r"^\| (`make [^|]*)\|", table, re.M)
                for t in re.findall(r"`make ([\w-]+)", row)}
    assert len(in_table) >= 15, "README's Makefile targets table was not found"
    assert not in_table - targets, f"README's table names no such target: {in_table - targets}"
    wrong = [f"{where}: make {m.group(1)}" for where, m in matches(MAKE)
             if m.group(1) not in targets]
    assert not wrong, "make targets the docs show that the Makefile lacks:\n" + "\n".join(wrong)
