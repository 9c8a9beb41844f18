"""accelerate ``save_state`` folders, written by a real ``Accelerator`` in the test."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("accelerate")

import ckptkit  # noqa: E402
from ckptkit import CheckpointManager, RNGState, UnsafeCheckpointError  # noqa: E402
from ckptkit.cli import _register_commands, cli  # noqa: E402


class Counter:
    """A custom object registered with ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.n = 0
        self.history: list[float] = []

    def state_dict(self) -> dict:
        return {"n": self.n, "history": list(self.history)}

    def load_state_dict(self, sd: dict) -> None:
        self.n, self.history = sd["n"], list(sd["history"])


def _objects(seed: int):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    acc = Accelerator(cpu=True)
    m1, m2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 2)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 0.9**s)
    m1, m2, o1, o2, s1, s2 = acc.prepare(m1, m2, o1, o2, s1, s2)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    state = {
        "model": m1,
        "model_1": m2,
        "optimizer": o1,
        "optimizer_1": o2,
        "scheduler": s1,
        "scheduler_1": s2,
        "custom_checkpoint_0": counter,
    }
    return acc, state


def _train(state: dict, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 4)
        loss = state["model_1"](state["model"](x)).pow(2).mean()
        loss.backward()
        for name in ("optimizer", "optimizer_1", "scheduler", "scheduler_1"):
            state[name].step()
        state["optimizer"].zero_grad()
        state["optimizer_1"].zero_grad()
        state["custom_checkpoint_0"].n += 1
        state["custom_checkpoint_0"].history.append(loss.item())


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


@pytest.fixture(scope="session")
def acc_dir(tmp_path_factory):
    """``save_state(dir)``, then two automatically named saves under ``checkpoints/``."""
    root = tmp_path_factory.mktemp("acc")
    acc, state = _objects(0)
    _train(state, 3)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    acc.save_state(str(root / "state"))
    saved = {k: copy.deepcopy(v.state_dict()) for k, v in state.items()}
    expected = _draws()
    acc.save_state(str(root / "bin"), safe_serialization=False)  # pytorch_model*.bin
    acc.project_configuration.set_directories(str(root / "project"))
    acc.project_configuration.automatic_checkpoint_naming = True
    for _ in range(2):
        _train(state, 1)
        acc.save_state()
    return root, saved, expected


def _saves(folder: Path) -> list[str]:
    """The checkpoint_<i> folders, oldest first (i counts saves: here 1 and 2)."""
    return sorted((p.name for p in folder.iterdir()), key=lambda n: int(n.split("_")[1]))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_accelerate_dir_is_recognised(acc_dir) -> None:
    root, _, _ = acc_dir
    info = ckptkit.inspect(str(root / "state"))
    assert info["format"] == "accelerate"
    assert {"model", "model_1", "optimizer", "optimizer_1", "scheduler", "scheduler_1"} <= set(
        info["state"]
    )
    assert {"custom_checkpoint_0", "rng"} <= set(info["state"])
    project = ckptkit.inspect(str(root / "project" / "checkpoints"))
    newest = _saves(root / "project" / "checkpoints")[-1]
    assert project["format"] == "accelerate" and project["source"].endswith(newest)


def test_restore_into_fresh_prepared_objects(acc_dir, tmp_path) -> None:
    root, saved, expected = acc_dir
    _, state = _objects(99)
    _train(state, 1)  # different values everywhere
    state["rng"] = RNGState()
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.restore(state, str(root / "state"))
    for key, value in saved.items():
        assert _equal(state[key].state_dict(), value), key
    assert state["custom_checkpoint_0"].n == 3
    assert _draws() == expected


def test_verify_and_resume_skip_a_damaged_save(acc_dir, tmp_path) -> None:
    root, _, _ = acc_dir
    project = Path(shutil.copytree(root / "project" / "checkpoints", tmp_path / "checkpoints"))
    older, newest = _saves(project)
    victim = project / newest / "optimizer_1.bin"
    victim.write_bytes(victim.read_bytes()[:100])
    _register_commands()
    result = CliRunner().invoke(cli, ["verify", str(project)])
    assert result.exit_code == 4 and "optimizer_1.bin" in result.output, result.output
    assert "OK      " + str(project / older) in result.output, result.output
    with pytest.warns(UserWarning, match=newest):
        info = ckptkit.inspect(str(project))
    assert info["source"].endswith(older)


def test_hostile_custom_state_is_refused(acc_dir, tmp_path) -> None:
    root, _, _ = acc_dir
    folder = Path(shutil.copytree(root / "state", tmp_path / "state"))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"n": Evil(), "history": []}, folder / "custom_checkpoint_0.pkl")
    _, state = _objects(5)
    before = {k: copy.deepcopy(v.state_dict()) for k, v in state.items()}
    with CheckpointManager(str(tmp_path / "run")) as mgr, pytest.raises(UnsafeCheckpointError):
        mgr.restore(state, str(folder))
    assert not marker.exists()
    assert all(_equal(state[k].state_dict(), v) for k, v in before.items())


@pytest.mark.parametrize(
    ("victim", "named"),
    [
        ("random_states_0.pkl", "random_states_0.pkl"),
        ("optimizer.bin", "optimizer.bin"),  # optimizer_1.bin is there: a gap
        ("model.safetensors", "model.safetensors"),
        ("scheduler_1.bin", "scheduler_1.bin"),  # a truncated one, below
    ],
)
def test_verify_names_what_a_save_lacks(acc_dir, tmp_path, victim, named) -> None:
    root, _, _ = acc_dir
    folder = Path(shutil.copytree(root / "state", tmp_path / "state"))
    if victim == "scheduler_1.bin":
        (folder / victim).write_bytes((folder / victim).read_bytes()[:50])
    else:
        (folder / victim).unlink()
    _register_commands()
    result = CliRunner().invoke(cli, ["verify", str(folder)])
    assert result.exit_code == 4 and named in result.output, result.output
    with pytest.raises(ckptkit.CorruptCheckpointError, match=named):
        ckptkit.load(str(folder))


def test_bin_weights_and_an_incomplete_series(acc_dir, tmp_path) -> None:
    root, saved, _ = acc_dir
    assert (root / "bin" / "pytorch_model_1.bin").exists()
    loaded = ckptkit.load(str(root / "bin"))
    assert _equal(loaded["model_1"], saved["model_1"]) and _equal(loaded["model"], saved["model"])
    folder = Path(shutil.copytree(root / "bin", tmp_path / "bin"))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ckptkit.CorruptCheckpointError, match="pytorch_model.bin"):
        ckptkit.load(str(folder))
