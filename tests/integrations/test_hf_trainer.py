"""The Hugging Face Trainer callback: every checkpoint committed into a ckptkit run,
readable by the CLI and ckptkit.load, and a bit-identical resume through the helper."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

import ckptkit  # noqa: E402
from ckptkit.cli import _register_commands, cli  # noqa: E402

from ..storage.conftest import BACKENDS, drive_root, make_backend_url  # noqa: E402, F401


@pytest.fixture(scope="module", autouse=True)
def commands() -> None:
    _register_commands()


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


class _Die(transformers.TrainerCallback):
    """Stops the job right after step ``at`` as a crash would (the output dir is lost)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def _trainer(out: Path, callbacks: list, max_steps: int = 6) -> transformers.Trainer:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        save_steps=2,
        max_steps=max_steps,
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(
    params=[pytest.param(k, marks=[pytest.mark.gcs] if k == "gs" else []) for k in BACKENDS]
)
def run_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return make_backend_url(request.param, request, tmp_path)


def test_every_checkpoint_is_a_ckptkit_checkpoint(tmp_path: Path, run_url: str) -> None:
    from ckptkit.integrations.hf import CkptkitCallback, latest_checkpoint_dir

    cb = CkptkitCallback(run_url, keep_last=2)
    trainer = _trainer(tmp_path / "out", [cb])
    assert cb.resume_dir(str(tmp_path / "out")) is None  # a fresh run
    trainer.train()
    trained = _weights(trainer.model)

    runner = CliRunner()
    ls = runner.invoke(cli, ["ls", run_url])
    assert ls.exit_code == 0, ls.output
    assert "step-000000000004" in ls.output and "step-000000000006" in ls.output
    assert "step-000000000002" not in ls.output  # keep_last=2
    verify = runner.invoke(cli, ["verify", run_url])
    assert verify.exit_code == 0, verify.output
    assert runner.invoke(cli, ["inspect", f"{run_url}/step-000000000006"]).exit_code == 0

    state = ckptkit.load(f"{run_url}/step-000000000006")
    assert torch.equal(state["model"]["transformer.wte.weight"], trained["transformer.wte.weight"])
    assert all(isinstance(v["exp_avg"], torch.Tensor) for v in state["optimizer"]["state"].values())
    assert isinstance(state["rng"]["torch"], torch.Tensor)  # the Trainer's RNG, as RNGState

    shutil.rmtree(tmp_path / "out")  # the machine is gone: only the run is left
    local = latest_checkpoint_dir(run_url, str(tmp_path / "out2"))
    assert local is not None and os.path.basename(local) == "checkpoint-6"
    loaded = transformers.GPT2LMHeadModel.from_pretrained(local)
    _same(_weights(loaded), trained)


def test_resume_after_a_crash_is_bit_identical(tmp_path: Path) -> None:
    from ckptkit.integrations.hf import CkptkitCallback

    straight = _trainer(tmp_path / "a", [])
    straight.train()

    url = str(tmp_path / "run")
    first = CkptkitCallback(url)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "b", [first, _Die(at=5)]).train()
    first.close()  # what the process's exit would do
    shutil.rmtree(tmp_path / "b")  # local checkpoints lost with the machine

    cb = CkptkitCallback(url)
    resumed = _trainer(tmp_path / "c", [cb])
    start = cb.resume_dir(str(tmp_path / "c"))
    assert start is not None and start.endswith("checkpoint-4")
    resumed.train(resume_from_checkpoint=start)
    _same(_weights(resumed.model), _weights(straight.model))
    steps = [c.step for c in ckptkit.CheckpointManager(url, readonly=True).list()]
    assert steps[-1] == 6 and 4 in steps  # the one resumed from is kept


def test_a_complete_local_checkpoint_is_committed_first_an_incomplete_one_ignored(
    tmp_path: Path,
) -> None:
    from ckptkit.integrations.hf import CkptkitCallback, latest_checkpoint_dir

    out = tmp_path / "out"
    _trainer(out, []).train()  # checkpoint-2, -4, -6 written, none committed
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # killed inside its save
    url = str(tmp_path / "run")
    local = latest_checkpoint_dir(url, str(out))
    assert local is not None and local.endswith("checkpoint-4")
    assert [c.step for c in ckptkit.CheckpointManager(url, readonly=True).list()] == [4]
    # an older local checkpoint than the run's latest is not committed again
    cb = CkptkitCallback(url)
    assert cb.resume_dir(str(out)).endswith("checkpoint-4")
    cb.close()
    assert [c.step for c in ckptkit.CheckpointManager(url, readonly=True).list()] == [4]


def test_best_by_metric_for_best_model_is_kept(tmp_path: Path) -> None:
    from ckptkit.integrations.hf import CkptkitCallback

    out = tmp_path / "out"
    _trainer(out, []).train()
    url = str(tmp_path / "run")
    # loss, lower is better: the Trainer's metric name without the eval_ prefix
    cb = CkptkitCallback(url, keep_last=1, keep_best=1, metric="eval_x", greater_is_better=True)
    for step, value in ((2, 3.0), (4, 1.0), (6, 2.0)):
        path = out / f"checkpoint-{step}"
        import json

        ts = json.loads((path / "trainer_state.json").read_text())
        ts["log_history"].append({"eval_x": value, "step": step})
        (path / "trainer_state.json").write_text(json.dumps(ts))
        cb.commit_dir(str(path))
    cb.close()
    steps = [c.step for c in ckptkit.CheckpointManager(url, readonly=True).list()]
    assert steps == [2, 6]  # best (greater is better: 3.0 at step 2) and the last


def test_missing_transformers_is_a_one_line_install_hint() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import ckptkit, ckptkit.manager\n"
        "try:\n"
        "    import ckptkit.integrations.hf\n"
        "except ckptkit.MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().count("\n") == 0
    assert "pip install" in out.stdout and "transformers" in out.stdout


def test_core_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, ckptkit, ckptkit.manager; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_retention_never_deletes_the_checkpoint_resumed_from(tmp_path: Path) -> None:
    from ckptkit.integrations.hf import CkptkitCallback

    url = str(tmp_path / "run")
    first = CkptkitCallback(url, keep_last=1)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "b", [first, _Die(at=3)]).train()
    first.close()
    cb = CkptkitCallback(url, keep_last=1)
    trainer = _trainer(tmp_path / "c", [cb])
    start = cb.resume_dir(str(tmp_path / "c"))
    assert start is not None and start.endswith("checkpoint-2")
    trainer.train(resume_from_checkpoint=start)
    steps = [c.step for c in ckptkit.CheckpointManager(url, readonly=True).list()]
    assert steps == [2, 6]  # keep_last=1, and the one resumed from
    # a later resume replaces the earlier rebuild and a killed rebuild's leftover
    leftover = tmp_path / "c" / "ckptkit-resume" / "checkpoint-5.tmp-99999"
    leftover.mkdir()
    again = CkptkitCallback(url, keep_last=1)
    assert again.resume_dir(str(tmp_path / "c")).endswith("checkpoint-6")
    again.close()
    assert os.listdir(tmp_path / "c" / "ckptkit-resume") == ["checkpoint-6"]


@pytest.mark.parametrize("name", ["../evil", "model.safetensors", "optimizer.pt"])
def test_a_crafted_file_name_in_the_run_is_refused(tmp_path: Path, name: str) -> None:
    from ckptkit.errors import CorruptCheckpointError
    from ckptkit.integrations.hf import latest_checkpoint_dir

    url = str(tmp_path / "run")
    with ckptkit.CheckpointManager(url) as mgr:
        data = torch.tensor([1, 2, 3], dtype=torch.uint8)
        mgr.save(2, {"model": {"w": torch.zeros(2)}, "hf_files": {name: data}})
    with pytest.raises(CorruptCheckpointError, match="bad file name"):
        latest_checkpoint_dir(url, str(tmp_path / "out" / "deep"))
    assert not (tmp_path / "out" / "evil").exists()
    assert not (tmp_path / "out" / "deep" / "ckptkit-resume" / "checkpoint-2").exists()
