"""The Time-LLM trainer: exact resume (in this process, and as real processes killed with
SIGKILL and SIGTERM), what a checkpoint holds, the resumes it refuses, what a run leaves.

Every run is the tiny one of ``train_script`` (12 steps of a 2-layer random GPT-2-shaped
LLM, checkpoint + validation every 4 steps, a loss record every 3) or a variant of it.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ckptkit
import timellm.train as train_mod
from timellm import build_model, load_dataset
from timellm.train import train

from .train_script import (
    CLI_ARGS,
    assert_same_weights,
    console_script,
    copy_run,
    finished_run,
    fork_server,
    one_thread,
    quiet,
    records,
    signal_group,
    steps,
    tiny_config,
    tiny_options,
    trainable,
    wait_until,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.getbasetemp())


@pytest.fixture
def sigterm_after(monkeypatch: pytest.MonkeyPatch):
    """``sigterm_after(n)``: this process gets SIGTERM right after the n-th optimizer step of
    the next ``train`` call, as from a scheduler: the step finishes, then the trainer saves."""

    def arm(n: int) -> None:
        real, calls = train_mod._train_step, [0]

        def step(*args, **kwargs):  # type: ignore[no-untyped-def]
            loss = real(*args, **kwargs)
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        monkeypatch.setattr(train_mod, "_train_step", step)

    return arm


# -- what a finished run leaves -------------------------------------------------


def test_run_leaves_outputs_and_its_checkpoints(finished: Path) -> None:
    for name in ("metrics.jsonl", "train.log", "loss.png", "summary.json", "run.json"):
        assert (finished / name).is_file(), name
    assert (finished / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((finished / "summary.json").read_text())
    run_name = json.loads((finished / "run.json").read_text())["run_name"]
    assert summary["run_name"] == run_name and summary["exit_code"] == 0
    assert f"run {run_name}: fresh start" in (finished / "train.log").read_text()
    # Upstream deletes its checkpoints when training ends; we keep them.
    assert steps(finished) == [4, 8, 12]
    recs = records(finished)
    assert [r["step"] for r in recs if "train_loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in recs if "val_mse" in r] == [4, 8, 12]
    assert all(np.isfinite(r["train_loss"]) for r in recs if "train_loss" in r)
    # Validated before saving: each checkpoint carries its own step's validation metrics.
    with ckptkit.CheckpointManager(str(finished), readonly=True) as mgr:
        saved = {c.step: c.metrics.get("val_mse") for c in mgr.list()}
    assert saved == {r["step"]: r["val_mse"] for r in recs if "val_mse" in r}


def test_test_evaluation_uses_the_best_checkpoint(finished: Path) -> None:
    recs = records(finished)
    vals = {r["step"]: r["val_mse"] for r in recs if "val_mse" in r}
    best = min(vals, key=vals.__getitem__)
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["best_step"] == best and recs[-1]["test_from_step"] == best
    with ckptkit.CheckpointManager(str(finished), readonly=True) as mgr:
        by_step = {c.step: c.url for c in mgr.list()}
    cfg = tiny_config()
    model = build_model(cfg)
    test_set = load_dataset(cfg.data, "test", cfg.seq_len, cfg.label_len, cfg.pred_len)
    evaluate = train_mod._Eval(test_set, cfg.batch_size, tiny_options("unused").eval_batches)

    def test_mse(step: int) -> float:
        model.load_trainable_state_dict(trainable(by_step[step]))
        return evaluate(model, torch.device("cpu"), cfg.pred_len)["mse"]

    assert summary["test_mse"] == pytest.approx(test_mse(best), rel=1e-6)
    assert best != 12, "the tiny run's best should not be its last step, else this proves nothing"
    assert summary["test_mse"] != pytest.approx(test_mse(12), rel=1e-6)


def test_checkpoint_holds_trainable_state_only(finished: Path) -> None:
    cfg = tiny_config()
    model = build_model(cfg)
    with ckptkit.CheckpointManager(str(finished), readonly=True) as mgr:
        latest = mgr.latest()
    assert latest is not None
    state = ckptkit.load(latest.url)
    assert not [k for k in state["model"]["tensors"] if k.startswith("llm_model.")]
    assert state["model"]["tensors"].keys() == model.trainable_state_dict().keys()
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.trainable_parameters())
    llm_bytes = sum(p.numel() * p.element_size() for p in model.llm_model.parameters())
    on_disk = sum(f.stat().st_size for f in Path(latest.url).iterdir())
    # Weights + Adam's two moments + a little training state: nothing the size of the LLM
    # (whose tiny stand-in here is smaller than the trainable part; a real one is GBs).
    assert on_disk < 3 * trainable_bytes + llm_bytes // 4, (on_disk, trainable_bytes, llm_bytes)


# -- refused resumes ------------------------------------------------------------


@pytest.mark.parametrize(
    "change", [{"llm_layers": 1}, {"llm": "tiny-llama"}], ids=["llm_layers", "tiny-llama"]
)
def test_resume_on_another_backbone_is_refused(
    finished: Path, tmp_path: Path, change: dict[str, object]
) -> None:
    run = copy_run(finished, tmp_path / "run")
    for force in (False, True):  # --force accepts another config, never another LLM
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match="another frozen LLM") as e:
            train(tiny_config(**change), tiny_options(run, force=force), echo=quiet)
        assert "tiny-gpt2, 2 layers" in str(e.value) and "--llm" in str(e.value)
    assert steps(run) == [4, 8, 12]
    # A checkpoint path given to --resume of a new run: refused after reading it.
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="another frozen LLM"):
        ckpt = str(finished / "step-000000000012")
        train(
            tiny_config(**change),
            tiny_options(tmp_path / "new", resume=ckpt, force=True),
            echo=quiet,
        )


def test_changed_training_config_needs_force(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "run")
    with pytest.raises(
        ckptkit.IncompatibleCheckpointError, match=r"learning_rate: 0\.01 -> 0\.005"
    ):
        train(tiny_config(learning_rate=0.005), tiny_options(run), echo=quiet)
    assert steps(run) == [4, 8, 12]
    lines: list[str] = []
    summary = train(
        tiny_config(learning_rate=0.005), tiny_options(run, force=True), echo=lines.append
    )
    assert summary["exit_code"] == 0 and "resumed at step 12" in lines[0]
    # max_steps is not part of the run's identity: a longer run resumes without --force.
    summary = train(tiny_config(max_steps=14), tiny_options(run), echo=quiet)
    assert summary["step"] == 14 and steps(run)[-1] == 14


# -- exact resume, in this process ------------------------------------------------


def test_sigterm_saves_the_current_step_and_resume_is_exact(
    finished: Path, tmp_path: Path, sigterm_after
) -> None:
    run = tmp_path / "run"
    sigterm_after(5)  # not a checkpoint step, and halfway between two loss records
    summary = train(tiny_config(), tiny_options(run), echo=quiet)
    assert (summary["exit_code"], summary["step"], summary["stopped"]) == (75, 5, "SIGTERM")
    assert steps(run) == [4, 5]
    assert json.loads((run / "summary.json").read_text())["exit_code"] == ckptkit.EXIT_RESUMABLE
    assert "stopped at step 5 (SIGTERM)" in (run / "train.log").read_text()
    name = json.loads((run / "run.json").read_text())["run_name"]

    sigterm_after(10**9)  # disarmed
    summary = train(tiny_config(), tiny_options(run, resume="latest"), echo=quiet)
    assert summary["exit_code"] == 0 and summary["run_name"] == name
    assert_same_weights(trainable(run), trainable(finished))
    assert records(run) == records(finished)
    log = (run / "train.log").read_text()
    assert f"run {name}: fresh start" in log and f"run {name}: resumed at step 5" in log


def _small_csv(path: Path) -> Path:
    """100 hourly rows of one variable: with seq_len 32 and 50 % of the training windows,
    3 steps of 4 per epoch."""
    t = np.arange(100)
    noise = np.random.default_rng(0).standard_normal(100)
    dates = pd.date_range("2020-01-01", periods=100, freq="h").strftime("%Y-%m-%d %H:%M:%S")
    pd.DataFrame({"date": dates, "OT": np.sin(t / 5) + 0.1 * noise}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("lradj", ["type1", "TST"])
def test_resume_across_epoch_ends_is_exact(tmp_path: Path, sigterm_after, lradj: str) -> None:
    # 3 epochs of 3 steps, checkpoints at each epoch's last batch: stopped there, the resumed
    # run must do the epoch end. type1 halves the LR per epoch, TST (OneCycle) per batch.
    csv = str(_small_csv(tmp_path / "small.csv"))
    cfg = tiny_config(data=csv, percent=50, max_steps=None, lradj=lradj, train_epochs=3)
    reference = train(cfg, tiny_options(tmp_path / "ref", save_steps=3, log_every=2), echo=quiet)
    assert reference["step"] == 9
    run = tmp_path / "run"
    for stop_after, stopped_at in ((3, 3), (2, 5)):
        sigterm_after(stop_after)
        summary = train(cfg, tiny_options(run, save_steps=3, log_every=2), echo=quiet)
        assert (summary["exit_code"], summary["step"]) == (75, stopped_at)
    sigterm_after(10**9)
    assert train(cfg, tiny_options(run, save_steps=3, log_every=2), echo=quiet)["step"] == 9
    assert_same_weights(trainable(run), trainable(tmp_path / "ref"))
    assert records(run) == records(tmp_path / "ref")
    lrs = [r["lr"] for r in records(run) if "lr" in r]
    assert len(set(lrs)) == (2 if lradj == "type1" else 5), lrs


def test_early_stopping_ends_the_run_at_the_validation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    opts = tiny_options(run, eval_every=1)
    summary = train(tiny_config(patience=1), opts, echo=quiet)
    stopped = summary["step"]
    vals = [r["val_mse"] for r in records(run) if "val_mse" in r]
    assert len(vals) == stopped < 12 and vals[-1] >= min(vals[:-1])
    assert summary["exit_code"] == 0 and steps(run)[-1] == stopped
    assert "early stopping: no improvement for 1 validations" in (run / "train.log").read_text()
    # Run again: it stays stopped.
    assert train(tiny_config(patience=1), opts, echo=quiet)["step"] == stopped


# -- exact resume, real processes --------------------------------------------------


def _said(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_processes_killed_and_resumed_equal_one_uninterrupted_run(
    tmp_path: Path,
) -> None:
    server = fork_server()
    run, ref = tmp_path / "run", tmp_path / "reference"
    logs = [tmp_path / f"{i}.log" for i in range(4)]
    # 1. The installed console script, SIGKILLed once a checkpoint is committed.
    first = console_script(logs[0], "train", *CLI_ARGS, "--output", str(run))
    wait_until(
        lambda: any(run.glob("step-*/manifest.json")) or first.poll() is not None,
        "the first checkpoint",
    )
    signal_group(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, logs[0].read_text()
    killed_at = steps(run)[-1]
    assert 4 <= killed_at < 12, logs[0].read_text()
    reference = server.start(logs[3], "train", *CLI_ARGS, "--output", str(ref))

    # 2. Resumed, and SIGTERM as soon as it says so: it finishes the step it is in, saves
    # that step and exits 75.
    second = server.start(logs[1], "train", *CLI_ARGS, "--output", str(run), "--resume", "latest")
    wait_until(
        lambda: (
            _said(logs[1], f"resumed at step {killed_at} ") or server.exit_code(second) is not None
        ),
        "the resumed process",
    )
    signal_group(second, signal.SIGTERM)
    assert server.wait(second) == 75, logs[1].read_text()
    found = re.search(r"stopped at step (\d+) \(SIGTERM\)", logs[1].read_text())
    assert found, logs[1].read_text()
    stopped = int(found[1])  # killed_at + 1 unless this test was slow to send the signal
    assert killed_at < stopped < 12 and steps(run)[-1] == stopped
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["step"], summary["exit_code"]) == (stopped, 75)

    # 3. Resumed to the end: the same weights and metrics as the uninterrupted run.
    third = server.start(logs[2], "train", *CLI_ARGS, "--output", str(run), "--resume", "latest")
    assert server.wait(third) == 0, logs[2].read_text()
    assert f"resumed at step {stopped} " in logs[2].read_text()
    assert server.wait(reference) == 0, logs[3].read_text()
    assert_same_weights(trainable(run), trainable(ref))
    assert records(run) == records(ref)
    names = set(re.findall(r" run (\S+): ", (run / "train.log").read_text()))
    assert names == {json.loads((run / "run.json").read_text())["run_name"]}
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()


class _OldTrainableState:
    """Time-LLM's TrainableState before the trainer switched to ckptkit.TrainableOnly, as it
    was (timellm/model/timellm.py): its state is the flat ``trainable_state_dict()``."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state_dict()

    def check_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.check_trainable_state_dict(state)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        self.model.load_trainable_state_dict(state, strict=strict)


def test_a_run_saved_before_trainable_only_resumes_exactly_and_predicts(
    finished: Path, tmp_path: Path, sigterm_after, monkeypatch: pytest.MonkeyPatch
) -> None:
    from timellm.predict import predict

    run = tmp_path / "run"
    new = getattr(train_mod, "TrainableOnly", None)
    monkeypatch.setattr(train_mod, "TrainableOnly", _OldTrainableState, raising=False)
    sigterm_after(5)
    assert train(tiny_config(), tiny_options(run), echo=quiet)["step"] == 5
    old = ckptkit.load(str(run))["model"]
    assert old.keys() == build_model(tiny_config()).trainable_state_dict().keys()
    forecast = predict(str(run), "ETTh1", str(tmp_path / "old.csv"), which="latest")
    assert len(forecast) == tiny_config().pred_len

    monkeypatch.setattr(train_mod, "TrainableOnly", new, raising=False)
    sigterm_after(10**9)  # disarmed
    summary = train(tiny_config(), tiny_options(run, resume="latest"), echo=quiet)
    assert summary["exit_code"] == 0
    assert ckptkit.load(str(run))["model"]["format"] == "ckptkit.trainable_only/1"
    assert_same_weights(trainable(run), trainable(finished))
