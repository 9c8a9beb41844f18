"""Hugging Face Trainer output directories, written by the real Trainer in the test.

A kill inside the Trainer's own save is simulated by removing or truncating files the
Trainer wrote, which is what such a kill leaves behind (it writes the weights, then
optimizer.pt, scheduler.pt, rng_state.pth and trainer_state.json last)."""

from __future__ import annotations

import copy
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

import ckptkit  # noqa: E402
from ckptkit import CheckpointManager, IncompatibleCheckpointError, RNGState  # noqa: E402
from ckptkit.cli import _register_commands, cli  # noqa: E402

CONFIG = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 16}


def _gpt2(**extra):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**CONFIG, **extra))


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(8) * (i + 1)) % 64
        return {"input_ids": ids, "labels": ids}


def _train(out: Path, *, steps: int = 6, only_model: bool = False, **model_extra) -> Path:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    args = TrainingArguments(
        str(out),
        max_steps=steps,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_only_model=only_model,
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = Trainer(model=_gpt2(**model_extra), args=args, train_dataset=_Tokens())
    trainer.train()
    trainer.save_model()  # the root model.safetensors a finished script leaves
    trainer.save_state()  # and its trainer_state.json
    return out


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory) -> Path:
    """checkpoint-2, -4, -6 and a root model.safetensors from save_model()."""
    return _train(tmp_path_factory.mktemp("hf") / "out")


@pytest.fixture(scope="session")
def hf_only_model(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("hf-only") / "out", steps=2, only_model=True)


@pytest.fixture
def out(hf_run, tmp_path) -> Path:
    """A copy of the run, free to damage."""
    return Path(shutil.copytree(hf_run, tmp_path / "out"))


def _verify(path: Path) -> tuple[int, str]:
    _register_commands()
    result = CliRunner().invoke(cli, ["verify", str(path)])
    return result.exit_code, result.output


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (what a kill leaves in checkpoint-6, the file verify must name)
DAMAGE = {
    "no-trainer-state": (lambda d: (d / "trainer_state.json").unlink(), "trainer_state.json"),
    "truncated-optimizer": (lambda d: _truncate(d / "optimizer.pt"), "optimizer.pt"),
    "no-rng": (lambda d: (d / "rng_state.pth").unlink(), "rng_state"),
    "no-scheduler": (lambda d: (d / "scheduler.pt").unlink(), "scheduler.pt"),
    "truncated-weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
    "model-only": (
        lambda d: [
            (d / n).unlink()
            for n in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
        ],
        "trainer_state.json",
    ),
    # Looks like save_only_model=True, but training_args.bin says it was not.
    "no-optimizer-scheduler-rng": (
        lambda d: [(d / n).unlink() for n in ("optimizer.pt", "scheduler.pt", "rng_state.pth")],
        "optimizer.pt, scheduler.pt, rng_state.pth",
    ),
    "damaged-trainer-state": (
        lambda d: (d / "trainer_state.json").write_text('{"global_step": 6,'),
        "trainer_state.json",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_reports_an_incomplete_checkpoint(out, damage) -> None:
    hurt, named = DAMAGE[damage]
    hurt(out / "checkpoint-6")
    code, text = _verify(out / "checkpoint-6")
    assert code == 4 and named in text, text
    code, text = _verify(out)
    assert code == 4 and named in text and "checkpoint-6" in text, text
    assert "OK      " + str(out / "checkpoint-4") in text, text


def test_verify_names_a_missing_rank(out) -> None:
    ckpt = out / "checkpoint-6"
    rng = (ckpt / "rng_state.pth").read_bytes()
    (ckpt / "rng_state.pth").unlink()
    for rank in (0, 2):  # three processes wrote rng_state_0..2; rank 1's is gone
        (ckpt / f"rng_state_{rank}.pth").write_bytes(rng)
    code, text = _verify(ckpt)
    assert code == 4 and "rng_state_1.pth" in text, text
    _truncate(ckpt / "rng_state_2.pth")
    (ckpt / "rng_state_1.pth").write_bytes(rng)
    code, text = _verify(ckpt)
    assert code == 4 and "rng_state_2.pth" in text, text


def test_pytorch_model_bin_checkpoint(out) -> None:
    """transformers 4.x with save_safetensors=False writes pytorch_model.bin (5.x has only
    safetensors): the same weights, torch-saved."""
    from safetensors.torch import load_file

    ckpt = out / "checkpoint-6"
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    assert _verify(ckpt)[0] == 0
    assert "transformer.wte.weight" in ckptkit.load(str(ckpt))["model"]
    _truncate(ckpt / "pytorch_model.bin")
    code, text = _verify(out)
    assert code == 4 and "pytorch_model.bin" in text, text


def test_final_output_dir_without_checkpoints_loads_its_model(hf_run, tmp_path) -> None:
    """save_strategy="no": only save_model()'s and save_state()'s files; not a checkpoint
    that lacks its optimizer."""
    final = tmp_path / "final"
    final.mkdir()
    for p in hf_run.iterdir():
        if p.is_file():
            shutil.copy(p, final / p.name)
    assert (final / "trainer_state.json").exists() and (final / "model.safetensors").exists()
    assert _verify(final)[0] == 0
    loaded = ckptkit.load(str(final))
    assert "transformer.wte.weight" in loaded["model"] and loaded["step"] == 6


def test_complete_checkpoints_verify(hf_run, hf_only_model) -> None:
    for path in (hf_run, hf_run / "checkpoint-6", hf_only_model / "checkpoint-2"):
        code, text = _verify(path)
        assert code == 0, text


@pytest.mark.parametrize("damage", ["no-trainer-state", "truncated-optimizer", "model-only"])
def test_resume_takes_the_newest_complete_checkpoint(out, tmp_path, damage) -> None:
    DAMAGE[damage][0](out / "checkpoint-6")
    assert (out / "model.safetensors").exists()  # save_model()'s weights are there too
    with pytest.warns(UserWarning, match="checkpoint-6"):
        loaded = ckptkit.load(str(out))
    assert loaded["step"] == 4 and "optimizer" in loaded and "rng" in loaded
    with pytest.warns(UserWarning, match="checkpoint-6"):
        info = ckptkit.inspect(str(out))
    assert info["step"] == 4 and info["source"].endswith("checkpoint-4")


def _trainer_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer the Trainer builds: weight decay off for biases and LayerNorm."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], ["bias", "layernorm", "rmsnorm"]))
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if n in decay], "weight_decay": 0.0},
        {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=5e-5)


def _snapshot(state: dict) -> dict:
    return {k: copy.deepcopy(v.state_dict()) for k, v in state.items() if hasattr(v, "state_dict")}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_tied_gpt2_restores_into_gpt2(hf_run, tmp_path) -> None:
    from safetensors.torch import load_file

    saved = load_file(hf_run / "checkpoint-4" / "model.safetensors")
    assert "lm_head.weight" not in saved  # the Trainer drops the tied copy
    model = _gpt2()
    opt = _trainer_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "rng": RNGState()}
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        result = mgr.restore(state, str(hf_run / "checkpoint-4"))
    assert result.step == 4
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    expected = torch.load(hf_run / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert _equal(opt.state_dict()["state"], expected["state"])


def test_untied_values_into_a_tied_model_are_refused(hf_run, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = Path(shutil.copytree(hf_run / "checkpoint-4", tmp_path / "checkpoint-4"))
    weights = load_file(ckpt / "model.safetensors")
    weights["lm_head.weight"] = weights["transformer.wte.weight"] + 1  # an untied model's
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = _gpt2()
    before = _snapshot({"model": model})
    with (
        CheckpointManager(str(tmp_path / "run")) as mgr,
        pytest.raises(IncompatibleCheckpointError, match="lm_head.weight"),
    ):
        mgr.restore({"model": model}, str(ckpt))
    assert _equal(_snapshot({"model": model}), before)


def test_other_param_groups_are_refused_before_anything_is_written(hf_run, tmp_path) -> None:
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)  # one group; the Trainer's has two
    state = {"model": model, "optimizer": opt, "rng": RNGState()}
    opt.zero_grad()
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    opt.step()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = _snapshot(state)
    with (
        CheckpointManager(str(tmp_path / "run")) as mgr,
        pytest.raises(IncompatibleCheckpointError, match="param groups"),
    ):
        mgr.restore(state, str(hf_run / "checkpoint-4"))
    assert _equal(_snapshot(state), before)
    assert random.random() == random.Random(5).random()  # the RNG was not restored either


def test_save_only_model_checkpoint(hf_only_model, tmp_path) -> None:
    model = _gpt2()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with CheckpointManager(str(tmp_path / "run")) as mgr:
            result = mgr.restore({"model": model}, str(hf_only_model))
    assert result.step == 2
    info = ckptkit.inspect(str(hf_only_model / "checkpoint-2"))
    assert any("save_only_model" in n for n in info["notes"])
