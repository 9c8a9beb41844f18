"""The ``ckptkit`` command: a click group whose commands are thin over the library.

Plugins add commands through the ``ckptkit_cli_commands`` hook. User errors
(``CkptError``, and any bare ``OSError``) become one-line messages with the exit code of
docs/EXIT_CODES.md, never tracebacks.
"""

from __future__ import annotations

import re
import sys
import warnings

import click

from ckptkit.errors import CkptError
from ckptkit.storage.local import storage_error


def _show_warning(message: Warning | str, category: type[Warning], *args: object) -> None:
    # One line per warning ("Warning: skipping ... (damaged)"), not file:line + source.
    click.secho(f"Warning: {as_flags(str(message))}", fg="yellow", err=True)


# Library messages name parameters (``break_lock=True``); a command shows its flag of
# the same meaning instead, and only a flag it has (never one that does not exist).
# Longest first: "resume='never', overwrite=True" is one piece of advice.
_FLAGS = {
    "resume='never', overwrite=True": "--resume never --overwrite",
    "resume='latest' or 'auto'": "--resume latest or auto",
    "resume='never'": "--resume never",
    "resume='auto'": "--resume auto",
    "resume='latest'": "--resume latest",
    "break_lock=True": "--break-lock",
    "overwrite=True": "--overwrite",
    "force=True": "--force",
    "trust=True": "--trust",
    "verify=False": "--no-verify",
}


def cli_message(message: str, command: click.Command | None) -> str:
    """``message`` with each library parameter replaced by ``command``'s flag for it."""
    opts = {o for p in (command.params if command else []) for o in p.opts + p.secondary_opts}
    for param, flag in _FLAGS.items():
        # Older messages name both ("trust=True (--trust)", "force=True / --force").
        pattern = re.escape(param) + rf"(?:\s*/\s*{re.escape(flag)}|\s*\({re.escape(flag)}\))?"
        wanted = [f for f in flag.split() if f.startswith("--")]
        shown = flag if all(f in opts for f in wanted) else param
        message = re.sub(pattern, lambda _, shown=shown: shown, message)
    return message


def as_flags(message: str) -> str:
    """``message`` as the command being run shows it: its flags for library parameters."""
    ctx = click.get_current_context(silent=True)
    return cli_message(message, ctx.command if ctx is not None else None)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except (CkptError, OSError) as exc:
                if not isinstance(exc, CkptError):
                    # A storage that let a bare OSError through (a plugin's, say): still
                    # one line with the storage's exit code, never a traceback.
                    exc = storage_error(exc.filename or "storage", exc)
                name = ctx.invoked_subcommand
                command = self.commands.get(name) if name else None
                click.secho(f"Error: {cli_message(str(exc), command)}", fg="red", err=True)
                ctx.exit(exc.exit_code)  # the table in docs/EXIT_CODES.md


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptkit")
def cli() -> None:
    """Checkpoints that survive preemption: inspect, list, verify and convert them,
    and train with plugins (e.g. `ckptkit train` from the Time-LLM plugin).

    RUN and PATH arguments are paths or URLs: /dir, file://, gs://bucket/dir,
    drive://folder (Colab's mounted Drive), memory://, any fsspec URL.
    """


def _register_commands() -> None:
    from ckptkit.cli import commands
    from ckptkit.hooks.manager import get_plugin_manager

    for cmd in commands.COMMANDS:
        cli.add_command(cmd)
    get_plugin_manager().hook.ckptkit_cli_commands(cli=cli)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        _register_commands()
    except CkptError as exc:
        click.secho(f"Error: {as_flags(str(exc))}", fg="red", err=True)
        sys.exit(exc.exit_code)
    cli.main(args=argv, prog_name="ckptkit")
