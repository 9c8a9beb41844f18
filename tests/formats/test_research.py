"""Research-code checkpoints, written in the test as the tools write them: nanoGPT's
``train.py`` dict (with a ``torch.compile``d model), DDP's ``module.`` prefix, Lightning
``.ckpt`` files, the file found in a folder, and safetensors recognised by content."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.cli import _register_commands, cli
from ckptkit.errors import CheckpointNotFoundError, IncompatibleCheckpointError
from ckptkit.manager import CheckpointManager


@pytest.fixture(scope="module", autouse=True)
def _commands():
    _register_commands()


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = torch.nn.Embedding(11, 4)
        self.head = torch.nn.Linear(4, 11)
        self.register_buffer("bias", torch.tril(torch.ones(3, 3)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.wte(idx))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory) -> tuple[Path, Net, dict[str, Any]]:
    """``out/ckpt.pt`` as nanoGPT's train.py writes it, with ``compile = True``.

    train.py wraps the model with ``torch.compile`` and saves ``raw_model.state_dict()``
    (``raw_model`` is the compiled wrapper when not under DDP), hence ``_orig_mod.`` keys.
    The compiled forward is never run here (CPU compilation is slow): the step goes
    through the uncompiled model, which shares the parameters."""
    out_dir = tmp_path_factory.mktemp("nanogpt") / "out"
    out_dir.mkdir()
    model_args = dict(n_layer=1, n_head=1, n_embd=4, block_size=3, bias=False, vocab_size=11)
    config = {"batch_size": 12, "learning_rate": 6e-4, "dataset": "shakespeare_char"}
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95))
    unoptimized_model = model
    model = torch.compile(model)
    raw_model = model
    _step(unoptimized_model, optimizer)
    iter_num, best_val_loss = 250, torch.tensor(1.4697)
    checkpoint = {
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
    }
    assert all(k.startswith("_orig_mod.") for k in checkpoint["model"])
    torch.save(checkpoint, out_dir / "ckpt.pt")
    return out_dir, unoptimized_model, optimizer.state_dict()


def test_nanogpt_inspect_takes_iter_num_as_step(nanogpt) -> None:
    out_dir, _, _ = nanogpt
    for path in (out_dir, out_dir / "ckpt.pt"):
        info = ckptkit.inspect(str(path))
        assert info["step"] == 250, path
        assert info["metrics"]["best_val_loss"] == pytest.approx(1.4697)


def test_load_keeps_keys_as_stored(nanogpt) -> None:
    out_dir, _, _ = nanogpt
    state = ckptkit.load(str(out_dir))
    assert set(state) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert all(k.startswith("_orig_mod.") for k in state["model"])


def test_nanogpt_restores_into_plain_model(nanogpt, tmp_path) -> None:
    out_dir, trained, opt_state = nanogpt
    model = Net()
    with torch.no_grad():
        model.head.weight.zero_()
    opt = torch.optim.AdamW(model.parameters())
    with CheckpointManager(str(tmp_path / "run")) as mgr, pytest.warns(UserWarning) as seen:
        result = mgr.restore({"model": model, "optimizer": opt}, str(out_dir))
    assert result.step == 250
    assert _same(model.state_dict(), trained.state_dict())
    assert opt.state_dict()["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    assert any("prefix '_orig_mod.' stripped" in str(w.message) for w in seen)


class DDPLike(torch.nn.Module):
    """What DistributedDataParallel's state_dict() looks like: the model under ``module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_ddp_prefix_stripped_and_added(tmp_path) -> None:
    model = Net()
    folder = tmp_path / "saved"
    folder.mkdir()
    torch.save(
        {"state_dict": DDPLike(model).state_dict(), "epoch": 3}, folder / "model_best.pth.tar"
    )
    plain = Net()
    with torch.no_grad():
        plain.head.bias.fill_(7)
    with CheckpointManager(str(tmp_path / "run")) as mgr, pytest.warns(UserWarning) as seen:
        mgr.restore({"model": plain}, str(folder))
    assert _same(plain.state_dict(), model.state_dict())
    assert any("prefix 'module.' stripped" in str(w.message) for w in seen)
    # The other way round: a plain save into a DDP-wrapped model gets the prefix added.
    torch.save({"model": model.state_dict(), "step": 5}, tmp_path / "plain.pt")
    wrapped = DDPLike(Net())
    with torch.no_grad():
        wrapped.module.head.bias.fill_(7)
    with CheckpointManager(str(tmp_path / "run2")) as mgr, pytest.warns(UserWarning) as seen:
        assert mgr.restore({"model": wrapped}, str(tmp_path / "plain.pt")).step == 5
    assert any("prefix 'module.' added" in str(w.message) for w in seen)
    assert _same(wrapped.module.state_dict(), model.state_dict())


def test_own_keys_win_over_prefix_mapping(tmp_path) -> None:
    """A model whose own parameters live under ``module`` restores as saved, unmapped;
    a prefixed checkpoint that fits no way is refused before anything is written."""
    model = DDPLike(Net())
    torch.save({"model": model.state_dict()}, tmp_path / "a.pt")
    target = DDPLike(Net())
    with CheckpointManager(str(tmp_path / "run")) as mgr, pytest.warns(UserWarning) as seen:
        mgr.restore({"model": target}, str(tmp_path / "a.pt"))
    assert not any("weight-name prefix" in str(w.message) for w in seen)
    other = torch.nn.Linear(4, 11)
    torch.save({"model": DDPLike(torch.nn.Linear(4, 5)).state_dict()}, tmp_path / "b.pt")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with (
        CheckpointManager(str(tmp_path / "run2")) as mgr,
        pytest.raises(IncompatibleCheckpointError),
    ):
        mgr.restore({"model": other, "optimizer": opt}, str(tmp_path / "b.pt"))
    assert _same(other.state_dict(), before)


@pytest.fixture(scope="module")
def lightning_dir(tmp_path_factory) -> Path:
    """A Lightning 2.6 run with ModelCheckpoint(save_last=True): ``epoch=0-step=2.ckpt``
    and ``last.ckpt`` side by side, written by Trainer.fit itself."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).sum()

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    root = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.tensor([[1, 2, 3], [3, 2, 1]]))
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        default_root_dir=str(root),
    )
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    # Kept outside the root: a file there would be a checkpoint candidate of its own.
    torch.save(module.net.state_dict(), root.parent / f"{root.name}-trained_net.pt")
    return root / "checkpoints"


def test_lightning_folder_lists_candidates_and_file_restores(lightning_dir, tmp_path) -> None:
    names = sorted(p.name for p in lightning_dir.iterdir())
    assert names == ["epoch=0-step=2.ckpt", "last.ckpt"]
    with pytest.raises(CheckpointNotFoundError) as exc:
        ckptkit.inspect(str(lightning_dir))
    message = str(exc.value)
    assert "\n" not in message and all(n in message for n in names)
    result = CliRunner().invoke(cli, ["inspect", str(lightning_dir)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert all(n in result.output for n in names)

    net = Net()
    with torch.no_grad():
        net.head.bias.fill_(7)
    with CheckpointManager(str(tmp_path / "run")) as mgr, pytest.warns(UserWarning) as seen:
        result = mgr.restore({"model": net}, str(lightning_dir / "epoch=0-step=2.ckpt"))
    assert result.step == 2
    root = lightning_dir.parent
    trained = torch.load(root.parent / f"{root.name}-trained_net.pt", weights_only=True)
    assert _same(net.state_dict(), trained)
    assert any("prefix 'net.' stripped" in str(w.message) for w in seen)
    assert all(
        k.startswith("net.") for k in ckptkit.load(str(lightning_dir / "last.ckpt"))["state_dict"]
    )


@pytest.mark.parametrize("name", ["last.ckpt", "epoch=3-step=100.ckpt", "model_best.pth.tar"])
def test_single_candidate_in_folder_is_found(tmp_path, name: str) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"state_dict": Net().state_dict(), "global_step": 100}, folder / name)
    (folder / "notes.txt").write_text("not a checkpoint")
    assert ckptkit.inspect(str(folder))["step"] == 100


def test_several_candidates_are_listed_not_guessed(tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("ckpt.pt", "model_best.pth.tar"):
        torch.save({"model": Net().state_dict(), "iter_num": 1}, folder / name)
    with pytest.raises(CheckpointNotFoundError) as exc:
        ckptkit.load(str(folder))
    message = str(exc.value)
    assert "ckpt.pt" in message and "model_best.pth.tar" in message and "\n" not in message


def test_safetensors_recognised_by_content(tmp_path) -> None:
    from safetensors.torch import save_file

    sd = Net().state_dict()
    save_file(sd, str(tmp_path / "weights"))
    assert _same(ckptkit.load(str(tmp_path / "weights"))["model"], sd)
    assert ckptkit.inspect(str(tmp_path / "weights"))["format"] == "state_dict"
    # Not safetensors after all: a file whose header length is absurd is not taken as one.
    (tmp_path / "junk").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointNotFoundError):
        ckptkit.load(str(tmp_path / "junk"))


def test_lightning_root_dir_is_searched(lightning_dir, tmp_path) -> None:
    """Pointing at Trainer's default_root_dir finds ``checkpoints/`` (no logger) or
    ``lightning_logs/version_N/checkpoints/``; several files are listed by their paths."""
    with pytest.raises(CheckpointNotFoundError) as exc:
        ckptkit.load(str(lightning_dir.parent))
    assert "checkpoints/last.ckpt" in str(exc.value)
    assert "checkpoints/epoch=0-step=2.ckpt" in str(exc.value)
    logged = tmp_path / "root" / "lightning_logs" / "version_0" / "checkpoints"
    logged.mkdir(parents=True)
    torch.save({"state_dict": Net().state_dict(), "global_step": 5}, logged / "epoch=0-step=5.ckpt")
    assert ckptkit.inspect(str(tmp_path / "root"))["step"] == 5


def test_folder_with_suffixless_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    sd = Net().state_dict()
    save_file(sd, str(tmp_path / "weights"))
    (tmp_path / "README").write_text("weights of the Net model")
    assert _same(ckptkit.load(str(tmp_path))["model"], sd)


@pytest.mark.slow
def test_real_ddp_checkpoint_restores_into_the_plain_model(tmp_path) -> None:
    """A checkpoint of a real ``DistributedDataParallel`` model (gloo, one process: the
    keys are what DDP writes at any world size) restores into the unwrapped model."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0,
                                world_size=1)
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        ddp = DDP(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp(torch.randn(5, 3)).sum().backward()
        opt.step()
        torch.save({{"state_dict": ddp.state_dict(), "epoch": 2}}, "{tmp_path}/ddp.pth")
        dist.destroy_process_group()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    saved = torch.load(tmp_path / "ddp.pth", weights_only=True)["state_dict"]
    assert saved and all(k.startswith("module.") for k in saved)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with CheckpointManager(str(tmp_path / "run")) as mgr, pytest.warns(UserWarning) as seen:
        mgr.restore({"model": plain}, str(tmp_path / "ddp.pth"))
    assert any("prefix 'module.' stripped" in str(w.message) for w in seen)
    assert _same(plain.state_dict(), {k.removeprefix("module."): v for k, v in saved.items()})
