"""Registers the Time-LLM commands through ckptkit's CLI hook (entry point group ``ckptkit``)."""

from __future__ import annotations

import click

from ckptkit import hookimpl


@hookimpl
def ckptkit_cli_commands(cli: click.Group) -> None:
    from ckptkit_timellm.commands import predict_cmd, train_cmd

    cli.add_command(train_cmd)
    cli.add_command(predict_cmd)
