"""The Lightning CheckpointIO: every checkpoint Lightning writes is a ckptkit checkpoint
of the run, the whole checkpoint dict comes back as it was, ModelCheckpoint's deletes go
through ckptkit and never remove the checkpoint the run resumed from."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import pathlib
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402, I001

import ckptkit  # noqa: E402
from ckptkit.cli import _register_commands, cli  # noqa: E402

from ..storage.conftest import BACKENDS, drive_root, make_backend_url  # noqa: E402, F401


@pytest.fixture(scope="module", autouse=True)
def commands() -> None:
    _register_commands()


@pytest.fixture(autouse=True)
def quiet() -> Any:
    # Trainer(deterministic=True) switches torch's deterministic mode on for the process.
    deterministic = torch.are_deterministic_algorithms_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        yield
    torch.use_deterministic_algorithms(deterministic)


def _io(url: str, **kwargs: Any) -> Any:
    # Imported here, not at module level: the module is what these tests are about.
    from ckptkit.integrations.lightning import CkptkitCheckpointIO

    return CkptkitCheckpointIO(url, **kwargs)


class _Model(pl.LightningModule):
    def __init__(self, lr: float = 0.1, **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3)}


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4
    )


def _trainer(root: Path, io: Any, steps: int, callbacks: list[Any]) -> Any:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        deterministic=True,
        default_root_dir=str(root),
        callbacks=callbacks,
        plugins=[io] if io is not None else [],
    )


def _fit(
    root: Path, io: Any, steps: int, callbacks: list[Any], ckpt_path: str | None = None, **hp: Any
) -> Any:
    pl.seed_everything(0, verbose=False)
    model = _Model(**hp)
    trainer = _trainer(root, io, steps, callbacks)
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer, model


def _assert_same(got: Any, want: Any, where: str = "checkpoint") -> None:
    """Equal structure and values: containers of the same kind (a dict and an
    OrderedDict count as the same), tensors equal in dtype and value."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and torch.equal(got, want), where
        return
    if isinstance(want, Mapping):
        assert isinstance(got, Mapping), f"{where}: {type(got).__name__}"
        if type(want) not in (dict, __import__("collections").OrderedDict):
            assert type(got) is type(want), f"{where}: {type(got)} is not {type(want)}"
        assert set(got) == set(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}[{k!r}]")
        return
    if hasattr(want, "_content") and hasattr(want, "_metadata"):  # OmegaConf containers
        assert type(got) is type(want), where
        from omegaconf import OmegaConf

        assert OmegaConf.to_container(got) == OmegaConf.to_container(want), where
        return
    assert type(got) is type(want), f"{where}: {type(got).__name__} is not {type(want).__name__}"
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, argparse.Namespace):
        _assert_same(vars(got), vars(want), where)
    else:
        assert got == want, where


def _hparams_kinds() -> list[Any]:
    from omegaconf import OmegaConf

    return [
        pytest.param(
            {
                "ns": argparse.Namespace(a=1, where=pathlib.Path("/data/x")),
                "shape": (2, 3),
                "tags": {"a", "b"},
                "device": torch.device("cpu"),
                "layers": OmegaConf.create([1, 2, {"k": "v"}]),
            },
            id="kwargs",
        ),
        pytest.param(
            {"cfg": OmegaConf.create({"lr": 0.1, "opt": {"name": "adam", "lr": "${lr}"}})},
            id="omegaconf",
        ),
    ]


@pytest.mark.parametrize("hp", _hparams_kinds())
def test_the_whole_checkpoint_dict_round_trips(tmp_path: Path, hp: dict[str, Any]) -> None:
    io = _io(str(tmp_path / "run"))
    callbacks = [
        ModelCheckpoint(every_n_train_steps=2, save_top_k=2, monitor="train_loss"),
        EarlyStopping(monitor="train_loss", patience=50),
    ]
    trainer, _ = _fit(tmp_path, io, 4, callbacks, **hp)
    want = trainer._checkpoint_connector.dump_checkpoint()
    assert {"loops", "callbacks", "optimizer_states", "lr_schedulers"} <= set(want)
    assert any(k.startswith("ModelCheckpoint{") for k in want["callbacks"])
    io.save_checkpoint(want, str(tmp_path / "elsewhere" / "by-hand.ckpt"))
    got = io.load_checkpoint(str(tmp_path / "elsewhere" / "by-hand.ckpt"))
    _assert_same(got, want)
    # ModelCheckpoint's monitored value is the checkpoint's metric (ckptkit ls shows it)
    assert set(io.manager.list()[-1].metrics) == {"train_loss"}
    io.teardown()


def test_omegaconf_hparams_type_class_round_trips(tmp_path: Path) -> None:
    # With OmegaConf hyper-parameters Lightning stores the class itself (hparams_type).
    from omegaconf import DictConfig, OmegaConf

    io = _io(str(tmp_path / "run"))
    ckpt = {"global_step": 3, "hyper_parameters": OmegaConf.create({"a": 1})}
    ckpt["hparams_type"] = DictConfig
    io.save_checkpoint(ckpt, "x/last.ckpt")
    got = io.load_checkpoint("x/last.ckpt")
    assert got["hparams_type"] is DictConfig
    _assert_same(got, ckpt)
    meta = io.manager.list()[-1].manifest.metadata["lightning"]
    assert {c["type"] for c in meta["converted"]} >= {"omegaconf.dictconfig.DictConfig"}
    io.teardown()


@pytest.fixture(
    params=[pytest.param(k, marks=[pytest.mark.gcs] if k == "gs" else []) for k in BACKENDS]
)
def run_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return make_backend_url(request.param, request, tmp_path)


def test_every_lightning_checkpoint_is_a_ckptkit_checkpoint(tmp_path: Path, run_url: str) -> None:
    io = _io(run_url)
    mc = ModelCheckpoint(every_n_train_steps=2, save_top_k=1, save_last=True)
    trainer, model = _fit(tmp_path, io, 6, [mc])
    # Lightning's top-1 and last.ckpt are both step 6: one checkpoint carries both names,
    # every older one was deleted through remove_checkpoint.
    infos = ckptkit.CheckpointManager(run_url, readonly=True).list()
    assert [i.step for i in infos] == [6]
    meta = infos[-1].manifest.metadata["lightning"]
    assert {os.path.basename(p) for p in meta["paths"]} == {"epoch=1-step=6.ckpt", "last.ckpt"}
    assert not (tmp_path / "checkpoints").exists()  # nothing written beside the run
    weights = ckptkit.load(infos[-1].url)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    assert io.resume_path() == infos[-1].url
    # Lightning's own names load too (ckpt_path="best" hands over best_model_path).
    assert io.load_checkpoint(mc.best_model_path)["global_step"] == 6
    assert io.load_checkpoint(mc.last_model_path)["global_step"] == 6
    io.teardown()
    out = CliRunner().invoke(cli, ["verify", run_url])
    assert out.exit_code == 0, out.output


def test_top_k_deletes_never_remove_the_checkpoint_resumed_from(tmp_path: Path) -> None:
    url = str(tmp_path / "run")

    def steps() -> list[int]:
        return [i.step for i in ckptkit.CheckpointManager(url, readonly=True).list()]

    def session(max_steps: int) -> None:
        io = _io(url)
        start = io.resume_path()
        _fit(tmp_path, io, max_steps, [ModelCheckpoint(every_n_train_steps=2)], ckpt_path=start)

    session(4)
    assert steps() == [4]
    # Resumed from step 4: Lightning's save_top_k=1 asks to delete it at step 6 (its
    # restored best_model_path); it stays. The step-6 one goes when step 8 replaces it.
    session(8)
    assert steps() == [4, 8]
    # A later session resumes from 8: that one is kept now, and the step-4 one that
    # Lightning gave up on in the previous session goes once a new checkpoint committed.
    session(10)
    assert steps() == [8, 10]


def test_a_name_saved_again_at_the_same_step_keeps_both_names(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    io = _io(url)
    state = {"global_step": 2, "state_dict": {"w": torch.ones(2)}}
    io.save_checkpoint(state, "ck/epoch=0-step=2.ckpt")
    io.save_checkpoint({**state, "extra": 1}, "ck/last.ckpt")
    io.remove_checkpoint("ck/epoch=0-step=2.ckpt")  # still last.ckpt: kept
    io.teardown()
    io = _io(url)  # (a load marks the resumed-from checkpoint: a fresh one for each part)
    assert io.load_checkpoint("ck/last.ckpt")["extra"] == 1
    with pytest.raises(ckptkit.CheckpointNotFoundError):
        io.load_checkpoint("ck/epoch=0-step=2.ckpt")
    io.teardown()
    io = _io(url)
    io.save_checkpoint({**state, "global_step": 4}, "ck/last.ckpt")  # last moves on
    assert [i.step for i in io.manager.list()] == [4]
    io.teardown()


def test_resume_path_is_none_on_a_fresh_run_and_skips_a_damaged_newest(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    io = _io(url)
    assert io.resume_path() is None
    for step in (2, 4):
        io.save_checkpoint({"global_step": step, "x": torch.ones(3)}, f"c/step={step}.ckpt")
    io.teardown()
    newest = ckptkit.CheckpointManager(url, readonly=True).list()[-1]
    for name in newest.manifest.files:
        path = tmp_path / "run" / newest.name / name
        path.write_bytes(path.read_bytes()[:-3])
    io = _io(url)
    with pytest.warns(ckptkit.CheckpointWarning):
        older = io.resume_path()
    assert older is not None and older.endswith(io.manager.list()[0].name)
    assert io.load_checkpoint(older)["global_step"] == 2
    with pytest.raises(ckptkit.CorruptCheckpointError):
        io.load_checkpoint(newest.url)
    io.teardown()


class _Color(enum.Enum):
    RED = 1


@pytest.mark.parametrize("value", [print, _Color.RED, torch.nn.Linear(1, 1), object()])
def test_code_in_the_hyper_parameters_is_refused_in_one_line(tmp_path: Path, value: Any) -> None:
    io = _io(str(tmp_path / "run"))
    with pytest.raises(ckptkit.ConfigError) as err:
        io.save_checkpoint({"global_step": 1, "hyper_parameters": {"act": value}}, "c/a.ckpt")
    message = str(err.value)
    assert "\n" not in message and "['hyper_parameters']['act']" in message
    assert "save_hyperparameters(ignore=" in message
    assert io.manager.list() == []
    io.teardown()


def test_the_run_file_records_names_lightning_removed(tmp_path: Path) -> None:
    io = _io(str(tmp_path / "run"))
    io.save_checkpoint({"global_step": 2}, "c/a.ckpt")
    io.save_checkpoint({"global_step": 2, "v": 1}, "c/last.ckpt")
    io.remove_checkpoint("c/a.ckpt")
    io.teardown()
    recorded = json.loads((tmp_path / "run" / "lightning.json").read_text())
    assert list(recorded["removed"].values()) == [["c/a.ckpt"]]
    # A new process knows: the name is gone, the checkpoint stays for last.ckpt.
    io = _io(str(tmp_path / "run"))
    with pytest.raises(ckptkit.CheckpointNotFoundError):
        io.load_checkpoint("c/a.ckpt")
    assert io.load_checkpoint("c/last.ckpt")["v"] == 1
    io.teardown()


def test_missing_lightning_is_a_one_line_install_hint() -> None:
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import ckptkit, ckptkit.manager\n"
        "try:\n"
        "    import ckptkit.integrations.lightning\n"
        "except ckptkit.MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() and out.stdout.strip().count("\n") == 0
    assert "pip install" in out.stdout and "ckptkit[lightning]" in out.stdout


def test_core_does_not_import_lightning() -> None:
    code = "import sys, ckptkit, ckptkit.manager; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inspect_sees_lightnings_optimizer_and_scheduler_lists(tmp_path: Path) -> None:
    io = _io(str(tmp_path / "run"))
    _fit(tmp_path, io, 2, [ModelCheckpoint(every_n_train_steps=2)])
    io.teardown()
    lacks = ckptkit.inspect(str(tmp_path / "run"))["lacks"]
    assert not [n for n in lacks if "optimizer" in n or "scheduler" in n], lacks


@dataclasses.dataclass
class _Config:
    width: int = 8
    name: str = "mlp"


def test_dataclasses_tuple_keys_and_numpy_values_are_stored(tmp_path: Path) -> None:
    import numpy as np

    io = _io(str(tmp_path / "run"))
    hp = {"cfg": _Config(), "lr": np.float64(0.5), "grid": np.arange(3), ("a", 1): "t"}
    io.save_checkpoint({"global_step": 1, "hyper_parameters": hp}, "c/a.ckpt")
    got = io.load_checkpoint("c/a.ckpt")["hyper_parameters"]
    # a dataclass comes back as its fields (its class is never imported on load)
    assert got["cfg"] == {"width": 8, "name": "mlp"}
    assert type(got["lr"]) is np.float64 and got["lr"] == 0.5
    assert isinstance(got["grid"], np.ndarray) and got["grid"].tolist() == [0, 1, 2]
    assert got[("a", 1)] == "t"
    kinds = {c["type"] for c in io.manager.list()[-1].manifest.metadata["lightning"]["converted"]}
    assert f"{__name__}._Config" in kinds
    io.teardown()


def test_latest_ckpt_path_takes_no_lock_and_refuses_an_all_damaged_run(tmp_path: Path) -> None:
    from ckptkit.integrations.lightning import latest_ckpt_path

    url = str(tmp_path / "run")
    assert latest_ckpt_path(url) is None
    io = _io(url)
    io.save_checkpoint({"global_step": 3, "x": torch.ones(2)}, "c/a.ckpt")
    assert latest_ckpt_path(url) == io.manager.list()[-1].url  # while io holds the lock
    io.teardown()
    info = ckptkit.CheckpointManager(url, readonly=True).list()[-1]
    for name in info.manifest.files:
        (tmp_path / "run" / info.name / name).write_bytes(b"x")
    with pytest.raises(ckptkit.CorruptCheckpointError, match="every checkpoint is damaged"):
        latest_ckpt_path(url)


def test_a_non_zero_rank_reads_the_run_without_taking_its_lock(tmp_path: Path) -> None:
    # Lightning's DDP launcher re-runs the script in each rank's process (RANK=1...): each
    # calls resume_path() while rank 0 holds the run.
    url = str(tmp_path / "run")
    io = _io(url)
    io.save_checkpoint({"global_step": 2, "x": torch.ones(2)}, "c/a.ckpt")
    code = (
        "from ckptkit.integrations.lightning import CkptkitCheckpointIO\n"
        f"io = CkptkitCheckpointIO({url!r})\n"
        "print(io.resume_path()); print(io.load_checkpoint('c/a.ckpt')['global_step'])\n"
        "io.teardown()\n"
    )
    env = {**os.environ, "RANK": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.split() == [io.manager.list()[-1].url, "2"]
    io.teardown()


@pytest.mark.parametrize(
    "entry",
    [
        {"at": ["hyper_parameters", "x"], "type": "numpy.ndarray"},
        {"at": ["hyper_parameters", "x"], "type": "omegaconf.dictconfig.DictConfig"},
        {"at": ["hyper_parameters", "x"], "type": "builtins.type"},
        {"at": ["hyper_parameters", "x", "deeper"], "type": "builtins.set"},
        {"at": "hyper_parameters", "type": "builtins.set"},
        ["not", "a", "record"],
    ],
)
def test_a_crafted_conversion_record_leaves_the_value_plain(tmp_path: Path, entry: Any) -> None:
    url = str(tmp_path / "run")
    io = _io(url)
    value = "a: !!python/object/apply:os.system ['echo pwned']"
    io.save_checkpoint({"global_step": 1, "hyper_parameters": {"x": value}}, "c/a.ckpt")
    io.teardown()
    info = ckptkit.CheckpointManager(url, readonly=True).list()[-1]
    path = tmp_path / "run" / info.name / "manifest.json"
    raw = json.loads(path.read_text())
    raw["metadata"]["lightning"]["converted"] = [entry]
    path.write_text(json.dumps(raw))
    io = _io(url)
    assert io.load_checkpoint("c/a.ckpt")["hyper_parameters"] == {"x": value}
    io.teardown()


def test_mid_epoch_resume_is_lightnings_own(tmp_path: Path) -> None:
    """With a plain DataLoader Lightning does not resume exactly mid-epoch (it warns "your
    dataloader is not resumable"): a resume through ckptkit is exactly Lightning's own
    resume from its own .ckpt of the same step, and both differ from an uninterrupted run."""

    def weights(model: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    own = ModelCheckpoint(dirpath=str(tmp_path / "own"), every_n_train_steps=2, save_top_k=-1)
    straight = weights(_fit(tmp_path / "a", None, 6, [own])[1])
    url = str(tmp_path / "run")
    _fit(tmp_path / "b", _io(url), 2, [ModelCheckpoint(every_n_train_steps=2)])  # step 2 of 4
    io = _io(url)
    resumed = _fit(tmp_path / "b", io, 6, [ModelCheckpoint()], ckpt_path=io.resume_path())[1]
    again = ModelCheckpoint(dirpath=str(tmp_path / "own2"))
    theirs = _fit(tmp_path / "c", None, 6, [again], ckpt_path=own.dirpath + "/epoch=0-step=2.ckpt")
    assert same(weights(resumed), weights(theirs[1]))
    assert not same(weights(theirs[1]), straight)


def test_a_container_holding_itself_is_refused_in_one_line(tmp_path: Path) -> None:
    io = _io(str(tmp_path / "run"))
    loop: dict[str, Any] = {"a": 1}
    loop["self"] = loop
    with pytest.raises(ckptkit.ConfigError, match="contains itself"):
        io.save_checkpoint({"global_step": 1, "hyper_parameters": loop}, "c/a.ckpt")
    io.teardown()
