"""One table of exit codes, docs/EXIT_CODES.md, matched by the error classes and by
what the CLI really exits with."""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pkgutil
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import ckptkit
import ckptkit.errors
from ckptkit import CheckpointManager
from ckptkit.cli import _register_commands, cli
from ckptkit.manager import EXIT_RESUMABLE

from .helpers import flip_byte

DOCS = Path(__file__).resolve().parents[2] / "docs"
TABLE = DOCS / "EXIT_CODES.md"


def _table() -> dict[str, int]:
    """``{name: code}`` from the table's rows: ``| 4 | `CorruptCheckpointError` | ...``."""
    rows: dict[str, int] = {}
    for line in TABLE.read_text().splitlines():
        if m := re.match(r"^\|\s*(\d+)\s*\|\s*`(\w+)`", line):
            assert m.group(2) not in rows, f"{m.group(2)} has two rows"
            rows[m.group(2)] = int(m.group(1))
    return rows


def _error_classes() -> dict[str, type[ckptkit.errors.CkptError]]:
    """Every error class of the package, wherever it is defined (a backend may add one)."""
    for module in pkgutil.walk_packages(ckptkit.__path__, "ckptkit."):
        with contextlib.suppress(ImportError):  # an optional extra that is not installed
            importlib.import_module(module.name)
    found, todo = {}, [ckptkit.errors.CkptError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("ckptkit"):
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


@pytest.fixture(scope="module", autouse=True)
def commands():
    _register_commands()


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_every_error_class_has_its_row_and_code():
    table = _table()
    classes = _error_classes()
    assert set(classes) <= set(table), f"no row for {sorted(set(classes) - set(table))}"
    for name, cls in classes.items():
        assert table[name] == cls.exit_code, name
    assert table["EXIT_RESUMABLE"] == EXIT_RESUMABLE
    assert table["OK"] == 0


def test_readme_and_format_point_to_the_one_table():
    for doc in (DOCS.parent / "README.md", DOCS / "FORMAT.md"):
        text = doc.read_text()
        assert "EXIT_CODES.md" in text, doc
        # No second table of codes elsewhere that could drift from this one.
        assert not re.search(r"^\|\s*\d+\s*\|\s*`\w+Error`", text, re.M), doc


def _raise(exc: BaseException) -> click.Command:
    @click.command("boom")
    def boom() -> None:
        raise exc

    return boom


@pytest.mark.parametrize(
    "exc",
    [
        *[cls("a problem: the fix") for cls in _error_classes().values()],
        OSError(errno.ENOSPC, "No space left on device", "/x"),
    ],  # fmt: skip
    ids=lambda e: type(e).__name__,
)
def test_cli_exits_with_the_table_code_and_one_line(exc):
    table = _table()
    cli.add_command(_raise(exc))
    try:
        result = invoke("boom")
    finally:
        cli.commands.pop("boom")
    expected = table["StorageError"] if type(exc) is OSError else table[type(exc).__name__]
    assert result.exit_code == expected, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def run(run_dir):
    with CheckpointManager(run_dir, keep_last=None) as mgr:
        for step in (1, 2):
            mgr.save(step, {"weights": {"w": torch.arange(8.0) * step}})
    return run_dir


def _file(run: str, step: int) -> str:
    folder = os.path.join(run, f"step-{step:012d}")
    return os.path.join(folder, next(f for f in os.listdir(folder) if f != "manifest.json"))


@pytest.mark.parametrize("damage", ["flip", "no manifest", "bad manifest"])
@pytest.mark.parametrize("target", ["run", "checkpoint"])
def test_verify_on_a_damaged_checkpoint_exits_4(run, damage, target):
    table = _table()
    assert invoke("verify", run).exit_code == table["OK"]
    ckpt = os.path.dirname(_file(run, 2))
    if damage == "flip":
        flip_byte(_file(run, 2))
    elif damage == "no manifest":
        os.remove(os.path.join(ckpt, "manifest.json"))
    else:
        with open(os.path.join(ckpt, "manifest.json"), "w") as f:
            f.write("[]")
    for args in ([run if target == "run" else ckpt], [run if target == "run" else ckpt, "--json"]):
        result = invoke("verify", *args)
        assert result.exit_code == table["CorruptCheckpointError"], (args, result.output)
        assert "Traceback" not in result.output


def test_cli_paths_exit_with_the_table_codes(run, tmp_path):
    table = _table()
    assert invoke("ls", str(tmp_path / "nope")).exit_code == table["CheckpointNotFoundError"]
    assert invoke("inspect", str(tmp_path / "nope")).exit_code == table["CheckpointNotFoundError"]
    assert invoke("ls").exit_code == table["ConfigError"]  # a usage error
    with CheckpointManager(str(tmp_path / "busy")):
        result = invoke("convert", os.path.join(run, "step-000000000001"), str(tmp_path / "busy"))
    assert result.exit_code == table["RunLockedError"]
    flip_byte(_file(run, 1))
    result = invoke("inspect", os.path.join(run, "step-000000000001"))
    assert result.exit_code == table["CorruptCheckpointError"]
