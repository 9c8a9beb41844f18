"""Legacy readers on real files: bare state_dict, Colab Time-LLM dicts, HF Trainer dirs."""

from __future__ import annotations

import io
import json
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptkit.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptkit.formats.hf import rng_state_from_hf
from ckptkit.formats.legacy import NO_LOADER, NO_OPTIMIZER, NO_RNG, NO_STEP, read_legacy
from ckptkit.state.early_stopping import EarlyStopping
from ckptkit.state.rng import RNGState
from ckptkit.storage.local import LocalStorage

from .helpers import assert_plain, torch_bytes


class RemoteLike(LocalStorage):
    """A backend with no local paths (like gs://): readers must use read_bytes."""

    def local_path(self, key: str) -> str | None:
        return None


@pytest.fixture(params=[LocalStorage, RemoteLike], ids=["local", "bytes-only"])
def storage_cls(request):
    return request.param


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _trained(steps: int = 3):
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=100)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _colab_dict(model, opt, sched, step: int = 300, scheduler: bool = True) -> dict:
    # What the Colab Time-LLM scripts save: numpy float64 from np.average(val losses).
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if scheduler else None,
        "epoch": 2,
        "global_step": step,
        "best_score": np.float64(-0.125),
        "val_loss_min": np.float64(0.125),
    }


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- bare state_dict (upstream Time-LLM) --------------------------------------------


def test_bare_state_dict_file_and_dir(tmp_path, storage_cls) -> None:
    model = _net()
    ck = tmp_path / "checkpoints" / "long_term_forecast_ETTh1_512_96" / "checkpoint"
    ck.parent.mkdir(parents=True)
    torch.save(model.state_dict(), ck)  # exactly what upstream EarlyStopping writes
    for url, key in (
        (str(ck), ""),
        (str(ck.parent), ""),
        (str(tmp_path), "checkpoints/long_term_forecast_ETTh1_512_96"),
    ):
        loaded = read_legacy(storage_cls(url), key)
        assert loaded is not None and loaded.kind == "legacy-state-dict"
        assert loaded.step is None and loaded.epoch is None
        for note in (NO_OPTIMIZER, NO_RNG, NO_STEP, NO_LOADER):
            assert note in loaded.notes
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        fresh.load_state_dict(loaded.state["model"])
        assert torch.equal(fresh[0].weight, model[0].weight)
        assert_plain(loaded.state)
        assert loaded.source.endswith("checkpoint") or loaded.source.endswith("96")


def test_safetensors_weights_file(tmp_path) -> None:
    sd = {k: v.contiguous() for k, v in _net().state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors")
    loaded = read_legacy(LocalStorage(str(tmp_path / "model.safetensors")))
    assert loaded.kind == "legacy-state-dict" and loaded.state["model"].keys() == sd.keys()


def test_module_prefix_is_noted(tmp_path) -> None:
    sd = {f"module.{k}": v for k, v in _net().state_dict().items()}
    _write(tmp_path / "checkpoint", torch_bytes(sd))
    loaded = read_legacy(LocalStorage(str(tmp_path)))
    assert any("'module.'" in n for n in loaded.notes)


# -- Colab Time-LLM dict checkpoints ------------------------------------------------


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2", "numpy1"])
def test_colab_dict_checkpoint(tmp_path, storage_cls, numpy1: bool) -> None:
    model, opt, sched = _trained()
    data = torch_bytes(_colab_dict(model, opt, sched), numpy1=numpy1)
    _write(tmp_path / "checkpoint_step_300" / "checkpoint.pt", data)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data), weights_only=True)

    loaded = read_legacy(storage_cls(str(tmp_path / "checkpoint_step_300" / "checkpoint.pt")))
    assert loaded.kind == "legacy-dict" and loaded.step == 300 and loaded.epoch == 2
    assert_plain(loaded.state)
    # The file's own names, plus the aliases restore maps (step, early_stopping).
    assert set(loaded.state) == {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "global_step",
        "best_score",
        "val_loss_min",
        "step",
        "early_stopping",
    }
    assert loaded.state["step"] == 300 and loaded.metrics["val_loss_min"] == 0.125
    assert NO_RNG in loaded.notes and NO_LOADER in loaded.notes

    model2, opt2, sched2 = _trained(0)
    model2.load_state_dict(loaded.state["model"])
    opt2.load_state_dict(loaded.state["optimizer"])
    sched2.load_state_dict(loaded.state["scheduler"])
    assert sched2.last_epoch == sched.last_epoch and opt2.state_dict()["state"][0]["step"] == 3
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )

    es = EarlyStopping(patience=3, delta=0.01, mode="min")
    es.load_state_dict(loaded.state["early_stopping"])
    assert es.best == 0.125 and es.counter == 0 and not es.should_stop
    assert (es.patience, es.delta) == (3, 0.01)  # the file never had them: ours stand
    es.delta = 0.0
    assert es.step(0.2) is False and es.step(0.1) is True  # compares against the saved best


def test_colab_dict_without_scheduler_and_inf_best(tmp_path) -> None:
    model, opt, sched = _trained()
    ck = _colab_dict(model, opt, sched, scheduler=False)
    ck.update(best_score=None, val_loss_min=float("inf"))  # before the first validation
    _write(tmp_path / "checkpoint", torch_bytes(ck))
    loaded = read_legacy(LocalStorage(str(tmp_path)))
    assert loaded.state["scheduler"] is None
    assert any("no scheduler state" in n for n in loaded.notes)
    assert loaded.state["early_stopping"]["best"] is None and "val_loss_min" not in loaded.metrics
    EarlyStopping().load_state_dict(loaded.state["early_stopping"])


def test_newest_step_dir_that_loads_wins(tmp_path, storage_cls) -> None:
    model, opt, sched = _trained()
    for step in (100, 200, 300):
        _write(
            tmp_path / f"checkpoint_step_{step}" / "checkpoint.pt",
            torch_bytes(_colab_dict(model, opt, sched, step)),
        )
    good = (tmp_path / "checkpoint_step_300" / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint_step_300" / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "checkpoint_step_1000").mkdir()  # created, then preempted before writing
    torch.save(model.state_dict(), tmp_path / "checkpoint")  # the early-stopping best model

    with pytest.warns(UserWarning) as record:
        loaded = read_legacy(storage_cls(str(tmp_path)))
    messages = " ".join(str(w.message) for w in record)
    assert "checkpoint_step_300" in messages and "checkpoint_step_1000" in messages
    assert loaded.step == 200 and loaded.kind == "legacy-dict"
    assert loaded.meta["skipped"] == ["checkpoint_step_1000", "checkpoint_step_300"]
    assert any("also found checkpoint" in n for n in loaded.notes)


def test_all_step_dirs_broken_is_corrupt(tmp_path) -> None:
    _write(tmp_path / "checkpoint_step_5" / "checkpoint.pt", b"PK\x03\x04junk")
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError, match="none of 1"):
        read_legacy(LocalStorage(str(tmp_path)))


def test_step_from_directory_name(tmp_path) -> None:
    _write(
        tmp_path / "checkpoint_step_40" / "checkpoint.pt",
        torch_bytes({"model": _net().state_dict()}),
    )
    loaded = read_legacy(LocalStorage(str(tmp_path)))
    assert loaded.step == 40 and loaded.state["step"] == 40 and NO_STEP not in loaded.notes


def test_generic_dict_names(tmp_path) -> None:
    model, opt, _ = _trained()
    ck = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "iteration": np.int64(12),
        "loss": np.float32(0.5),
        "config": {"lr": 1e-3, "name": "x"},
    }
    _write(tmp_path / "ck.pth", torch_bytes(ck))
    loaded = read_legacy(LocalStorage(str(tmp_path / "ck.pth")))
    assert loaded.step == 12 and loaded.epoch is None
    assert set(ck) | {"model", "optimizer", "step"} == set(loaded.state)
    assert loaded.metrics == {"loss": 0.5} and loaded.state["config"]["name"] == "x"
    assert_plain(loaded.state)


def test_lightning_style_lists(tmp_path) -> None:
    model, opt, sched = _trained()
    ck = {
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "epoch": 1,
        "global_step": 9,
    }
    _write(tmp_path / "last.ckpt", torch_bytes(ck))
    loaded = read_legacy(LocalStorage(str(tmp_path / "last.ckpt")))
    assert set(ck) | {"model", "optimizer", "scheduler", "step"} == set(loaded.state)


# -- refusal, corruption, unknown ---------------------------------------------------


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_malicious_legacy_file(tmp_path) -> None:
    marker = tmp_path / "pwned"
    ck = {"model": _net().state_dict(), "epoch": 1, "hook": _Evil(str(marker))}
    _write(tmp_path / "run" / "checkpoint", torch_bytes(ck))
    with pytest.raises(UnsafeCheckpointError, match=r"system.*trust"):
        read_legacy(LocalStorage(str(tmp_path / "run")))
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 100, -50])
def test_truncated_legacy_file(tmp_path, cut: int) -> None:
    data = torch_bytes(_net().state_dict())
    _write(tmp_path / "checkpoint", data[:cut])
    with pytest.raises(CorruptCheckpointError, match="checkpoint"):
        read_legacy(LocalStorage(str(tmp_path)))


def test_not_a_legacy_checkpoint(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert read_legacy(LocalStorage(str(tmp_path / "notes.txt"))) is None
    assert read_legacy(LocalStorage(str(tmp_path))) is None
    assert read_legacy(LocalStorage(str(tmp_path / "missing"))) is None
    (tmp_path / "manifest.json").write_text("{}")
    torch.save(_net().state_dict(), tmp_path / "checkpoint")
    assert read_legacy(LocalStorage(str(tmp_path))) is None  # native: the lead's reader
    _write(tmp_path / "t.pt", torch_bytes(torch.ones(2)))
    assert read_legacy(LocalStorage(str(tmp_path / "t.pt"))) is None


# -- Hugging Face Trainer checkpoint-N ----------------------------------------------


def _hf_checkpoint(path, step: int = 30, sharded: bool = False) -> dict:
    """A checkpoint-N directory with the file names and contents transformers writes."""
    path.mkdir(parents=True)
    model, opt, sched = _trained()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if sharded:
        names = sorted(sd)
        shards = {
            "model-00001-of-00002.safetensors": names[:2],
            "model-00002-of-00002.safetensors": names[2:],
        }
        for shard, keys in shards.items():
            save_file({k: sd[k] for k in keys}, path / shard)
        index = {
            "metadata": {"total_size": 0},
            "weight_map": {k: s for s, ks in shards.items() for k in ks},
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save(sched.state_dict(), path / "scheduler.pt")
    trainer_state = {
        "global_step": step,
        "epoch": 1.5,
        "best_metric": 0.42,
        "best_model_checkpoint": None,
        "log_history": [
            {"loss": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 10},
            {"eval_loss": 0.42, "epoch": 1.0, "step": 20},
            {"loss": 0.8, "learning_rate": 5e-4, "epoch": 1.5, "step": 30},
        ],
    }
    (path / "trainer_state.json").write_text(json.dumps(trainer_state))
    torch.save(
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        },
        path / "rng_state.pth",
    )
    (path / "training_args.bin").write_bytes(torch_bytes({"x": 1}))
    return {"model": sd, "optimizer": opt, "scheduler": sched}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_trainer_checkpoint(tmp_path, storage_cls, sharded: bool) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    orig = _hf_checkpoint(tmp_path / "checkpoint-30", sharded=sharded)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "checkpoint-30" / "rng_state.pth", weights_only=True)

    loaded = read_legacy(storage_cls(str(tmp_path / "checkpoint-30")))
    assert loaded.kind == "hf-trainer" and loaded.step == 30 and loaded.epoch == 1
    assert loaded.metrics["eval_loss"] == 0.42 and loaded.metrics["loss"] == 0.8
    assert loaded.metrics["best_metric"] == 0.42
    assert set(loaded.state) == {"model", "optimizer", "scheduler", "rng", "step", "epoch"}
    assert_plain(loaded.state)
    assert loaded.meta["trainer_state"]["global_step"] == 30
    assert (
        any("training_args.bin not read" in n for n in loaded.notes) and NO_LOADER in loaded.notes
    )

    model = _net()
    model.load_state_dict(loaded.state["model"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in orig["model"].items())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded.state["optimizer"])
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=100).load_state_dict(
        loaded.state["scheduler"]
    )

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    RNGState().load_state_dict(loaded.state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_hf_output_dir_picks_newest_checkpoint(tmp_path) -> None:
    _hf_checkpoint(tmp_path / "checkpoint-10", step=10)
    _hf_checkpoint(tmp_path / "checkpoint-20", step=20)
    (tmp_path / "checkpoint-20" / "optimizer.pt").write_bytes(b"PK\x03\x04")
    with pytest.warns(UserWarning, match="checkpoint-20"):
        loaded = read_legacy(LocalStorage(str(tmp_path)))
    assert loaded.step == 10


def test_hf_pytorch_model_bin_and_distributed_rng(tmp_path) -> None:
    path = tmp_path / "checkpoint-7"
    path.mkdir()
    torch.save(_net().state_dict(), path / "pytorch_model.bin")
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
    for rank in (0, 1):
        torch.save(state, path / f"rng_state_{rank}.pth")
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt, scheduler.pt, trainer_state"):
        read_legacy(LocalStorage(str(path)))  # what a kill inside the Trainer's save leaves
    _, opt, sched = _trained()
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save(sched.state_dict(), path / "scheduler.pt")
    (path / "trainer_state.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = read_legacy(LocalStorage(str(path)))
    assert loaded.step is None and NO_STEP in loaded.notes and NO_OPTIMIZER not in loaded.notes
    assert any("rank 0" in n for n in loaded.notes) and "rng" in loaded.state


def test_hf_rng_layouts() -> None:
    base = {"python": random.getstate(), "numpy": None, "cpu": torch.get_rng_state()}
    assert rng_state_from_hf(base) is None
    assert rng_state_from_hf([1]) is None


def test_hf_missing_shard_is_corrupt(tmp_path) -> None:
    _hf_checkpoint(tmp_path / "checkpoint-3", sharded=True)
    (tmp_path / "checkpoint-3" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read_legacy(LocalStorage(str(tmp_path / "checkpoint-3")))
