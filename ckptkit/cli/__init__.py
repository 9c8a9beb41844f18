"""The ``ckptkit`` command: a click group whose commands are thin over the library.

Plugins add commands through the ``ckptkit_cli_commands`` hook. User errors
(``CkptError``) become one-line messages with a non-zero exit code, never tracebacks.
"""

from __future__ import annotations

import sys
import warnings

import click

from ckptkit.errors import CkptError

# Library messages name parameters (``force=True``); a command line user needs the flag.
_FLAGS = {
    "trust=True": "--trust",
    "force=True": "--force",
    "overwrite=True": "--overwrite",
    "break_lock=True": "--break-lock",
    "verify=False": "--no-verify",
    "resume='latest'": "--resume latest",
    "resume='auto'": "--resume auto",
    "resume='never'": "--resume never",
}


def as_flags(message: str) -> str:
    """``message`` with the library's parameter names replaced by this CLI's flags."""
    for param, flag in _FLAGS.items():
        message = message.replace(param, flag)
    return message


def _show_warning(message: Warning | str, category: type[Warning], *args: object) -> None:
    # One line per warning ("Warning: skipping ... (damaged)"), not file:line + source.
    click.secho(f"Warning: {as_flags(str(message))}", fg="yellow", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except CkptError as exc:
                click.secho(f"Error: {as_flags(str(exc))}", fg="red", err=True)
                ctx.exit(exc.exit_code)


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
