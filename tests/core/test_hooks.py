"""Every hook, exercised by a real plugin object on a fresh plugin manager, plus a
meta-test (as datasette's tests/test_plugins.py) that fails when a hookspec has no
``test_hook_<name>...`` test here, no docstring, or no section in docs/PLUGINS.md."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import sys
import textwrap
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from ckptkit import CheckpointManager, hookimpl
from ckptkit.cli import _register_commands, cli
from ckptkit.hooks import manager as hooks_manager
from ckptkit.hooks import spec
from ckptkit.hooks.manager import get_plugin_manager
from ckptkit.storage.local import LocalStorage
from ckptkit.storage.registry import open_storage

PLUGINS_MD = Path(__file__).resolve().parents[2] / "docs" / "PLUGINS.md"
HOOKS = sorted(
    name
    for name, fn in inspect.getmembers(spec, inspect.isfunction)
    if hasattr(fn, f"{spec.PROJECT}_spec")
)


def _state(step: int) -> dict:
    return {"weights": {"w": torch.full((2,), float(step))}, "tag": step}


def _register(plugin: object) -> object:
    get_plugin_manager().register(plugin)
    return plugin


# -- the meta-tests ------------------------------------------------------------


def test_hookspecs_are_found():
    # Guards the meta-tests below against passing vacuously.
    assert len(HOOKS) >= 8
    assert {"ckptkit_register_storage", "ckptkit_before_delete", "ckptkit_cli_commands"} <= set(
        HOOKS
    )
    assert all(name.startswith("ckptkit_") for name in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    tests = [name for name in globals() if name.startswith(f"test_hook_{hook}")]
    assert tests, f"hook {hook} has no test: add test_hook_{hook}... to {__file__}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    doc = inspect.getdoc(getattr(spec, hook)) or ""
    assert len(doc) > 20, f"hook {hook} has no docstring in ckptkit/hooks/spec.py"
    text = PLUGINS_MD.read_text()
    assert f"### `{hook}(" in text, f"hook {hook} has no section in docs/PLUGINS.md"
    params = list(inspect.signature(getattr(spec, hook)).parameters)
    section = text.split(f"### `{hook}(", 1)[1].split("\n###", 1)[0]
    heading = section.split("`", 1)[0]
    assert all(p in heading for p in params), f"docs/PLUGINS.md: {hook} signature is stale"


def test_docs_name_no_hook_that_does_not_exist():
    text = PLUGINS_MD.read_text()
    documented = {
        line.split("`", 2)[1].split("(", 1)[0]
        for line in text.splitlines()
        if line.startswith("### `ckptkit_")
    }
    assert documented == set(HOOKS)


# -- storage -------------------------------------------------------------------


class PrefixStorage(LocalStorage):
    """``testfs:///some/dir`` -> the local directory /some/dir."""

    def __init__(self, url: str) -> None:
        super().__init__(url.removeprefix("testfs://"))
        self.url = url


class StoragePlugin:
    @hookimpl
    def ckptkit_register_storage(self):
        return {"testfs": PrefixStorage}


def test_hook_ckptkit_register_storage_adds_a_scheme(tmp_path):
    _register(StoragePlugin())
    url = f"testfs://{tmp_path}/run"
    with CheckpointManager(url) as mgr:
        info = mgr.save(1, _state(1))
        assert isinstance(mgr.storage, PrefixStorage)
        assert info.url == f"{url}/step-000000000001"
    assert os.path.exists(tmp_path / "run" / "step-000000000001" / "manifest.json")
    state = _state(0)
    with CheckpointManager(url, readonly=True) as mgr:
        assert mgr.restore(state) == 1 and state["tag"] == 1


def test_hook_ckptkit_register_storage_import_string_is_lazy(tmp_path, monkeypatch):
    module = tmp_path / "lazy_backend_for_ckptkit_tests.py"
    module.write_text(
        textwrap.dedent(
            """
            from ckptkit.storage.local import LocalStorage

            def open_lazy(url):
                return LocalStorage(url.removeprefix("lazy://"))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_backend_for_ckptkit_tests", raising=False)

    class LazyPlugin:
        @hookimpl
        def ckptkit_register_storage(self):
            return {"lazy": "lazy_backend_for_ckptkit_tests:open_lazy"}

    _register(LazyPlugin())
    open_storage(str(tmp_path))  # another scheme: the module stays unimported
    assert "lazy_backend_for_ckptkit_tests" not in sys.modules
    storage = open_storage(f"lazy://{tmp_path}/x")
    assert storage.root == str(tmp_path / "x")
    assert "lazy_backend_for_ckptkit_tests" in sys.modules


def test_hook_ckptkit_register_storage_later_plugin_replaces_builtin(tmp_path):
    opened = []

    class Replacement:
        @hookimpl
        def ckptkit_register_storage(self):
            def factory(url):
                opened.append(url)
                return LocalStorage(url)

            return {"": factory, "file": factory}

    _register(Replacement())
    with CheckpointManager(str(tmp_path / "run")):
        pass
    assert opened == [str(tmp_path / "run")]


# -- extra state ---------------------------------------------------------------


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, sd):
        self.value = sd["value"]


class ExtraStatePlugin:
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    @hookimpl
    def ckptkit_extra_state(self, manager):
        return {"plugin_counter": self.counter}


def test_hook_ckptkit_extra_state_is_saved_and_restored(run_dir):
    _register(ExtraStatePlugin(Counter(41)))
    with CheckpointManager(run_dir) as mgr:
        info = mgr.save(1, _state(1))
    assert "plugin_counter" in info.manifest.entries

    hooks_manager.reset_plugin_manager()
    restored = Counter(0)
    _register(ExtraStatePlugin(restored))
    state = _state(0)
    with CheckpointManager(run_dir) as mgr:
        assert mgr.restore(state) == 1
    assert restored.value == 41
    assert "plugin_counter" not in state  # the user's dict only gets its own keys back


def test_hook_ckptkit_extra_state_never_overrides_the_users_keys(run_dir):
    _register(ExtraStatePlugin(Counter(1)))
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, {"plugin_counter": 99})
    state = {"plugin_counter": 0}
    with CheckpointManager(run_dir) as mgr:
        mgr.restore(state)
    assert state["plugin_counter"] == 99


# -- save / commit / delete / restore events -----------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def ckptkit_before_save(self, manager, step, state):
        visible = [c.step for c in manager.list()]
        self.events.append(("before_save", step, sorted(state), visible))

    @hookimpl
    def ckptkit_after_save(self, manager, info):
        self.events.append(("after_save", info.step, [c.step for c in manager.list()]))

    @hookimpl
    def ckptkit_after_commit(self, manager, info):
        with CheckpointManager(manager.url, readonly=True) as reader:  # another reader sees it
            self.events.append(("after_commit", info.step, [c.step for c in reader.list()]))

    @hookimpl
    def ckptkit_after_restore(self, manager, info, state):
        self.events.append(("after_restore", info.step, state.get("tag")))


def test_hook_ckptkit_before_save_runs_before_anything_is_written(run_dir):
    recorder = _register(Recorder())
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    before = [e for e in recorder.events if e[0] == "before_save"]
    assert before == [
        ("before_save", 1, ["tag", "weights"], []),
        ("before_save", 2, ["tag", "weights"], [1]),
    ]


def test_hook_ckptkit_after_save_runs_before_rotation(run_dir):
    recorder = _register(Recorder())
    with CheckpointManager(run_dir, keep_last=1, keep_best=0) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        assert [c.step for c in mgr.list()] == [2]
    after = [e for e in recorder.events if e[0] == "after_save"]
    assert after == [("after_save", 1, [1]), ("after_save", 2, [1, 2])]


def test_hook_ckptkit_after_commit_sees_a_visible_checkpoint(run_dir):
    recorder = _register(Recorder())
    with CheckpointManager(run_dir) as mgr:
        mgr.save(7, _state(7))
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["before_save", "after_save", "after_commit"]
    assert recorder.events[-1] == ("after_commit", 7, [7])


class Veto:
    def __init__(self, keep_step: int) -> None:
        self.keep_step = keep_step
        self.asked: list[int] = []

    @hookimpl
    def ckptkit_before_delete(self, manager, info):
        self.asked.append(info.step)
        return False if info.step == self.keep_step else None


def test_hook_ckptkit_before_delete_can_veto(run_dir):
    veto = _register(Veto(keep_step=1))
    with CheckpointManager(run_dir, keep_last=1, keep_best=0) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
        assert [c.step for c in mgr.list()] == [1, 3]
        assert mgr.delete(mgr.list()[0]) is False
    assert veto.asked == [1, 1, 2, 1]


def test_hook_ckptkit_after_restore_gets_the_loaded_state(run_dir):
    recorder = _register(Recorder())
    with CheckpointManager(run_dir) as mgr:
        assert not mgr.restore(_state(0)).resumed  # nothing restored: no event
        mgr.save(3, _state(3))
        mgr.restore(_state(0))
    restores = [e for e in recorder.events if e[0] == "after_restore"]
    assert restores == [("after_restore", 3, 3)]


# -- CLI -----------------------------------------------------------------------


@click.command("hello")
@click.argument("who")
def hello_cmd(who: str) -> None:
    """Say hello (a plugin command)."""
    click.echo(f"hello {who}")


class CliPlugin:
    @hookimpl
    def ckptkit_cli_commands(self, cli):
        cli.add_command(hello_cmd)


@pytest.fixture
def restore_cli_commands():
    before = dict(cli.commands)
    yield
    cli.commands.clear()
    cli.commands.update(before)


def test_hook_ckptkit_cli_commands_adds_a_command(restore_cli_commands):
    _register(CliPlugin())
    _register_commands()
    result = CliRunner().invoke(cli, ["hello", "world"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello world\n"
    assert "hello" in CliRunner().invoke(cli, ["--help"]).output


# -- discovery -----------------------------------------------------------------


class _EntryPoint:
    def __init__(self, name: str, obj: object = None, error: Exception | None = None) -> None:
        self.name, self.value, self._obj, self._error = name, f"{name}_pkg.plugin", obj, error

    def load(self) -> object:
        if self._error is not None:
            raise self._error
        return self._obj


def test_entry_points_load_unless_autoload_is_disabled(monkeypatch):
    plugin = StoragePlugin()
    eps = [_EntryPoint("good", plugin), _EntryPoint("broken", error=ImportError("no gcsfs"))]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)

    monkeypatch.setenv(hooks_manager.AUTOLOAD_ENV, "1")
    hooks_manager.reset_plugin_manager()
    assert get_plugin_manager().get_plugin("good") is None

    monkeypatch.delenv(hooks_manager.AUTOLOAD_ENV)
    hooks_manager.reset_plugin_manager()
    with pytest.warns(UserWarning, match=r"plugin 'broken' .*no gcsfs.*CKPTKIT_DISABLE"):
        pm = get_plugin_manager()
    assert pm.get_plugin("good") is plugin
    assert pm.get_plugin("broken") is None
