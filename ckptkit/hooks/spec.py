"""Every ckptkit hook, in one typed module (pluggy project name ``ckptkit``).

Plugin authors import only the ``hookimpl`` marker::

    from ckptkit import hookimpl

    @hookimpl
    def ckptkit_register_storage():
        return {"s3x": "mypkg.storage:S3XStorage"}

Built-in features (local/fsspec/gs/drive storage, RNG state, the Time-LLM commands)
register through these same hooks. Plugins are discovered from the entry-point group
``ckptkit``; set ``CKPTKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to skip discovery (tests do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from ckptkit.manager import CheckpointInfo, CheckpointManager

PROJECT = "ckptkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ckptkit_register_storage() -> dict[str, Any]:
    """Return ``{scheme: factory}``; a factory is a callable ``factory(url) -> Storage``
    or an import string ``"module:attr"`` naming one (imported only when the scheme is
    used, so optional packages stay optional). Later registrations win, so a plugin can
    replace a built-in backend."""


@hookspec
def ckptkit_extra_state(manager: CheckpointManager) -> dict[str, Any] | None:
    """Return named stateful objects (``state_dict()``/``load_state_dict()``) to save
    and restore with every checkpoint of ``manager``, in addition to the user's state."""


@hookspec
def ckptkit_before_save(manager: CheckpointManager, step: int, state: dict[str, Any]) -> None:
    """Called before anything of checkpoint ``step`` is written."""


@hookspec
def ckptkit_after_save(manager: CheckpointManager, info: CheckpointInfo) -> None:
    """Called after the checkpoint's files are written, before rotation runs."""


@hookspec
def ckptkit_after_commit(manager: CheckpointManager, info: CheckpointInfo) -> None:
    """Called once the checkpoint is committed (its manifest is visible to readers)."""


@hookspec
def ckptkit_before_delete(manager: CheckpointManager, info: CheckpointInfo) -> bool | None:
    """Called before rotation deletes a checkpoint; return ``False`` to keep it."""


@hookspec
def ckptkit_after_restore(
    manager: CheckpointManager, info: CheckpointInfo, state: dict[str, Any]
) -> None:
    """Called after ``state`` was loaded from the checkpoint ``info``."""


@hookspec
def ckptkit_cli_commands(cli: click.Group) -> None:
    """Add commands to the ``ckptkit`` CLI group (``cli.add_command(...)``)."""
