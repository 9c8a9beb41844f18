"""Configs saved next to the weights (argparse, SimpleNamespace, pathlib, OmegaConf) load as
plain data without importing or calling their classes; everything else is refused by name,
for every pickle protocol; a DCP ``.metadata`` is parsed the same way."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import types
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.cli import _register_commands, cli
from ckptkit.errors import UnsafeCheckpointError

from .helpers import assert_plain

omegaconf = pytest.importorskip("omegaconf")
OmegaConf = omegaconf.OmegaConf
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _commands():
    _register_commands()


class EvilNamespace(argparse.Namespace):
    """A Namespace subclass whose construction or state-setting leaves a canary."""

    canary = ""

    def __init__(self, **kw):
        super().__init__(**kw)

    def __setstate__(self, state):
        Path(state["canary"]).write_text("constructed")
        self.__dict__.update(state)


class Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Custom:
    def __init__(self) -> None:
        self.value = 3


def research_dict() -> dict:
    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(
        lr=0.1, epochs=3, out=Path("/runs/exp1"), tags=["a", "b"], sub=types.SimpleNamespace(k=1)
    )
    cfg = OmegaConf.create(
        {
            "model": {"dim": 8, "layers": [1, 2, "x"]},
            "name": "run",
            "missing": "???",
            "ref": "${name}",
        }
    )
    return {
        "model": model.state_dict(),
        "epoch": 2,
        "args": args,
        "cfg": cfg,
        "list_cfg": OmegaConf.create([1, {"z": 2.5}]),
        "paths": [PurePosixPath("data/train"), PureWindowsPath("C:/data/x")],
    }


EXPECTED = {
    "args": {
        "lr": 0.1,
        "epochs": 3,
        "out": "/runs/exp1",
        "tags": ["a", "b"],
        "sub": {"k": 1},
    },
    "cfg": {
        "model": {"dim": 8, "layers": [1, 2, "x"]},
        "name": "run",
        "missing": "???",
        "ref": "${name}",
    },
    "list_cfg": [1, {"z": 2.5}],
    "paths": ["data/train", "C:\\data\\x"],
}


@pytest.mark.parametrize("protocol", [2, 4, 5, "legacy"])
def test_configs_load_as_plain_data(tmp_path, protocol) -> None:
    path = tmp_path / "ckpt.pt"
    kwargs = (
        {"_use_new_zipfile_serialization": False}
        if protocol == "legacy"
        else {"pickle_protocol": protocol}
    )
    torch.save(research_dict(), path, **kwargs)
    out = ckptkit.load(str(path))
    for key, value in EXPECTED.items():
        assert out[key] == value, key
    assert out["model"]["weight"].shape == (2, 3)
    assert_plain(out)


def test_inspect_and_restore_read_configs_without_trust(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(research_dict(), path)
    info = ckptkit.inspect(str(path))
    assert info["state"]["args"]["lr"] == 0.1
    assert "argparse.Namespace" in info["config_globals"]
    assert "omegaconf.dictconfig.DictConfig" in info["config_globals"]
    assert info["unsafe_globals"] == []
    model = torch.nn.Linear(3, 2)
    state = {"model": model, "args": None}
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.restore(state, str(path))
    assert state["args"] == EXPECTED["args"]
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "argparse.Namespace" in result.output


_AUDIT = textwrap.dedent(
    """
    import sys, json, types
    import torch, ckptkit
    from ckptkit.formats import safe  # everything ckptkit itself needs is imported now
    watched = ("argparse", "omegaconf", "pathlib")
    if sys.argv[2] == "gone":
        for name in list(sys.modules):
            if name.split(".")[0] in watched:
                del sys.modules[name]
    else:  # booby-trapped stand-ins: touching any attribute of them leaves a trace
        touched = []
        class Trap(types.ModuleType):
            def __getattr__(self, attr):
                touched.append(f"{self.__name__}.{attr}")
                raise AttributeError(attr)
        for name in ("argparse", "omegaconf", "omegaconf.dictconfig", "omegaconf.listconfig",
                     "omegaconf.nodes", "omegaconf.base", "pathlib", "pathlib._local"):
            sys.modules[name] = Trap(name)
    events = []
    def hook(event, args):
        if event == "import" and str(args[0]).split(".")[0] in watched:
            events.append(str(args[0]))
        if event == "object.__setattr__" and type(args[0]).__module__.split(".")[0] in watched:
            events.append("setattr " + type(args[0]).__module__)
    sys.addaudithook(hook)
    out = ckptkit.load(sys.argv[1])
    touched = locals().get("touched", [])
    print(json.dumps({"events": events, "touched": touched, "args": out["args"],
                      "cfg": out["cfg"], "paths": out["paths"]}))
    """
)


@pytest.mark.parametrize("mode", ["gone", "trapped"])
def test_audit_nothing_imported_nothing_constructed(tmp_path, mode) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(research_dict(), path)
    script = tmp_path / "audit.py"
    script.write_text(_AUDIT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(script), str(path), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["events"] == [] and report["touched"] == []
    assert report["args"] == EXPECTED["args"] and report["cfg"] == EXPECTED["cfg"]


def test_a_subclass_of_an_allowlisted_class_is_refused_not_constructed(tmp_path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "ckpt.pt"
    torch.save({"args": EvilNamespace(canary=str(canary))}, path)
    with pytest.raises(UnsafeCheckpointError, match="EvilNamespace") as exc:
        ckptkit.load(str(path))
    assert "trust" in str(exc.value) and "could run code" in str(exc.value)
    assert not canary.exists()


def _hostile(marker: Path) -> dict:
    return {
        "w": torch.ones(2),
        "x": Exploit(str(marker)),
        "c": Custom(),
        "ok": argparse.Namespace(),
    }


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_inspect_lists_every_unlisted_global_for_every_protocol(tmp_path, protocol) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_hostile(marker), path, pickle_protocol=protocol)
    # the file really uses the opcode this protocol names globals with
    import zipfile

    with zipfile.ZipFile(path) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    ops = {op.name for op, _, _ in pickletools.genops(pkl)}
    assert ("STACK_GLOBAL" if protocol >= 4 else "GLOBAL") in ops

    expected = {f"{os.system.__module__}.system", f"{__name__}.Custom"}
    with pytest.raises(UnsafeCheckpointError) as exc:
        ckptkit.inspect(str(path))
    assert set(exc.value.globals) == expected
    for name in expected:
        assert name in str(exc.value)

    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", "--json", str(path)])
    assert result.exit_code == 5
    report = json.loads(result.stdout)
    assert set(report["unsafe_globals"]) == expected and report["complete"] is False
    human = runner.invoke(cli, ["inspect", str(path)])
    assert human.exit_code == 5
    for name in expected:
        assert name in human.output
    assert "argparse.Namespace" not in json.dumps(report["unsafe_globals"])
    assert not marker.exists()


def test_plain_pickle_globals_are_found_for_every_protocol() -> None:
    from ckptkit.formats.pickles import scan_globals

    for protocol in range(6):
        data = pickle.dumps([Custom(), os.system, argparse.Namespace(a=1)], protocol=protocol)
        names = scan_globals(data)
        assert f"{__name__}.Custom" in names and f"{os.system.__module__}.system" in names


def test_trust_loads_and_names_what_it_ran(tmp_path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"c": Custom(), "w": torch.ones(1)}, path)
    with pytest.warns(UserWarning, match=rf"executing pickled code .*{__name__}\.Custom"):
        info = ckptkit.inspect(str(path), trust=True)
    assert info["unsafe_globals"] == [f"{__name__}.Custom"]


def test_trust_reads_a_whole_pickled_module(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        ckptkit.load(str(path))
    with pytest.warns(UserWarning, match="executing pickled code"):
        out = ckptkit.load(str(path), trust=True)
    assert out["model"]["weight"].shape == (2, 3)


def test_trust_on_a_module_whose_class_is_gone_says_so(tmp_path) -> None:
    path = tmp_path / "model.pt"
    script = textwrap.dedent(
        f"""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(2, 2)
        torch.save(Net(), {str(path)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    with pytest.warns(UserWarning), pytest.raises(ckptkit.CkptError) as exc:
        ckptkit.load(str(path), trust=True)
    message = str(exc.value)
    assert "truncated or damaged" not in message and "__main__" in message


# -- torch.distributed.checkpoint metadata --------------------------------------------
def test_dcp_metadata_parses_without_unpickling(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    from ckptkit.formats.dcp import read_metadata

    state = {"model": {"w": torch.ones(2, 3), "b": torch.zeros(3)}, "step": 5}
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    meta = read_metadata((tmp_path / "dcp" / ".metadata").read_bytes(), source="dcp")
    tensors = meta["state_dict_metadata"]
    assert tensors["model.w"]["size"] == [2, 3]
    assert tensors["model.w"]["properties"]["dtype"] == "float32"
    assert tensors["step"]["type"] == "BytesStorageMetadata"
    files = {e["value"]["relative_path"] for e in meta["storage_data"]}
    assert files and all((tmp_path / "dcp" / f).exists() for f in files)
    json.dumps(meta)  # plain data only


@pytest.mark.parametrize("protocol", [2, 4])
def test_hostile_dcp_metadata_is_refused(tmp_path, protocol) -> None:
    from ckptkit.formats.dcp import read_metadata

    marker = tmp_path / "pwned"
    data = pickle.dumps({"state_dict_metadata": Exploit(str(marker))}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_metadata(data, source="evil/.metadata")
    assert not marker.exists()


def _hidden_global(via_call: bool) -> bytes:
    """A protocol-4 pickle that hides os.system from a naive scan: STACK_GLOBAL's names
    come back from the memo after being popped, or from the result of a call."""

    def text(value: str) -> bytes:  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(value)]) + value.encode()

    if via_call:  # str("os"): the module name exists only once the call has run
        names = text("builtins") + text("str") + b"\x93" + text("os") + b"\x85R" + text("system")
    else:  # pushed, memoized, popped, then fetched back from the memo
        names = text("os") + b"\x94" + text("system") + b"\x94" + b"00" + b"h\x00h\x01"
    return b"\x80\x04" + names + b"\x93" + text("touch /tmp/pwned") + b"\x85R."


@pytest.mark.parametrize("via_call", [False, True], ids=["memo", "computed"])
def test_hidden_stack_globals_are_found_and_refused(via_call: bool) -> None:
    from ckptkit.formats.dcp import read_metadata
    from ckptkit.formats.pickles import scan_globals

    data = _hidden_global(via_call)
    names = scan_globals(data)
    assert ("<computed global>" if via_call else "os.system") in names
    with pytest.raises(UnsafeCheckpointError):
        read_metadata(data, source="evil/.metadata")
