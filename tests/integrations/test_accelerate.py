"""ckptkit.integrations.accelerate: an Accelerator's whole state as a ckptkit checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

import ckptkit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))


def _example(url: str, steps: int, save: int = 5) -> None:
    from accelerate_loop import main

    assert main(["--output", url, "--max-steps", str(steps), "--save-steps", str(save)]) == 0


def _last(url: str) -> dict:
    infos = ckptkit.CheckpointManager(url, readonly=True).list()
    return ckptkit.load(infos[-1].url)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n = sd["n"]


def _setup(seed: int, *, batches: int = 4, two: bool = False):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    acc = Accelerator(cpu=True)
    models = [torch.nn.Linear(4, 3)] + ([torch.nn.Linear(3, 2)] if two else [])
    opts = [torch.optim.AdamW(models[0].parameters(), lr=1e-2)]
    if two:
        opts.append(torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9))
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2) for o in opts]
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(batches * 2, 4)), batch_size=2, shuffle=True
    )
    out = acc.prepare(*models, *opts, *scheds, data)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    return acc, out, counter


def _train(acc, objs, counter, steps: int) -> None:
    n = (len(objs) - 1) // 3  # models, optimizers, schedulers, then the loader
    model, opt, sched, data = objs[0], objs[n], objs[2 * n], objs[-1]
    it = iter(data)
    for _ in range(steps):
        (xb,) = next(it)
        acc.backward(model(xb).square().mean())
        opt.step()
        sched.step()
        opt.zero_grad()
        counter.n += 1


def test_resume_mid_epoch_ends_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, stopped = str(tmp_path / "a"), str(tmp_path / "b")
    _example(straight, 23)
    _example(stopped, 12)  # saves at 5, 10 and 12 (mid-epoch: 5 batches an epoch)
    assert [c.step for c in ckptkit.CheckpointManager(stopped, readonly=True).list()] == [5, 10, 12]
    _example(stopped, 23)
    a, b = _last(straight), _last(stopped)
    assert _equal(a["model"], b["model"])
    assert a["custom_checkpoint_0"] == b["custom_checkpoint_0"] == {"samples": 23 * 8}
    assert a["dataloader"]["iteration"] == b["dataloader"]["iteration"] == 4
    assert a["dataloader"]["batches"] == b["dataloader"]["batches"] == 3


def test_the_loader_position_is_what_makes_it_exact(tmp_path: Path) -> None:
    """Without the epoch-start snapshot the resumed epoch reshuffles: the test above
    would fail. Restore everything but drop the loader state, and the weights differ."""
    from accelerate_loop import main

    straight, stopped = str(tmp_path / "a"), str(tmp_path / "b")
    _example(straight, 13)
    _example(stopped, 12)
    mgr = ckptkit.CheckpointManager(stopped)
    info = mgr.list()[-1]
    state = ckptkit.load(info.url)
    state["dataloader"] = {**state["dataloader"], "epoch_rng": None}
    mgr.save(12, state)  # the same checkpoint, its epoch-start RNG snapshot dropped
    mgr.close()
    main(["--output", stopped, "--max-steps", "13", "--save-steps", "5"])
    assert not _equal(_last(straight)["model"], _last(stopped)["model"])


def test_checkpoint_holds_every_part_unwrapped(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    acc, objs, counter = _setup(0, two=True)
    _train(acc, objs, counter, 3)
    with CkptkitAccelerate(acc, str(tmp_path / "run")) as ck:
        info = ck.save(3, metrics={"loss": 1.0})
    assert info is not None and info.step == 3
    saved = ckptkit.load(info.url)
    expected = {"model", "model_1", "optimizer", "optimizer_1", "scheduler", "scheduler_1"}
    expected |= {"custom_checkpoint_0", "rng", "dataloader", "accelerator"}
    assert set(saved) == expected
    assert set(saved["model"]) == {"weight", "bias"}  # unwrapped: no "module." prefix
    assert _equal(saved["model"], objs[0].state_dict())
    assert saved["optimizer"]["state"][0]["exp_avg"].shape == (3, 4)
    assert saved["optimizer_1"]["param_groups"][0]["momentum"] == 0.9
    assert saved["scheduler"]["last_epoch"] == 3
    assert saved["custom_checkpoint_0"] == {"n": 3}
    assert set(saved["rng"]["ranks"][0]) == {"python", "numpy", "torch", "cuda", "generators"}
    cls = info.manifest.metadata["state_classes"]
    assert cls["optimizer"] == "torch.optim.adamw.AdamW"  # the optimizer, not the wrapper


def test_resume_restores_every_part_into_fresh_objects(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    url = str(tmp_path / "run")
    acc, objs, counter = _setup(0, two=True)
    _train(acc, objs, counter, 3)
    with CkptkitAccelerate(acc, url) as ck:
        ck.save(3)
    expected = [o.state_dict() for o in objs[:6]]
    after = torch.rand(3)  # what the RNG gives next, after the save

    acc2, objs2, counter2 = _setup(1, two=True)
    with CkptkitAccelerate(acc2, url) as ck:
        result = ck.resume()
    assert result.resumed and result.step == 3
    assert counter2.n == 3
    assert torch.equal(torch.rand(3), after)
    for want, obj in zip(expected, objs2[:6], strict=True):
        assert str(obj.state_dict()) == str(want)


def test_resume_from_accelerates_own_save_state_folder(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    acc, objs, counter = _setup(0)
    _train(acc, objs, counter, 2)
    acc.save_state(str(tmp_path / "saved"))
    weights = {k: v.clone() for k, v in objs[0].state_dict().items()}

    acc2, objs2, counter2 = _setup(1)
    with CkptkitAccelerate(acc2, str(tmp_path / "run")) as ck:
        result = ck.resume(str(tmp_path / "saved"))
    assert result.resumed
    assert _equal(objs2[0].state_dict(), weights)
    assert counter2.n == 2
    assert objs2[2].state_dict()["last_epoch"] == 2  # (model, optimizer, scheduler, loader)


def test_a_loader_of_another_length_is_refused_naming_the_fix(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    url = str(tmp_path / "run")
    acc, objs, counter = _setup(0, batches=4)
    with CkptkitAccelerate(acc, url) as ck:
        ck.save(1)
    acc2, objs2, _ = _setup(0, batches=5)
    before = {k: v.clone() for k, v in objs2[0].state_dict().items()}
    with (
        CkptkitAccelerate(acc2, url) as ck,
        pytest.raises(ckptkit.IncompatibleCheckpointError, match="same dataset, batch size"),
    ):
        ck.resume()
    assert _equal(objs2[0].state_dict(), before)  # all or nothing: nothing was loaded


def test_the_grad_scaler_is_saved_and_restored(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    url = str(tmp_path / "run")
    acc, _, _ = _setup(0)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    with CkptkitAccelerate(acc, url) as ck:
        ck.save(1)
    acc2, _, _ = _setup(0)
    acc2.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    with CkptkitAccelerate(acc2, url) as ck:
        ck.resume()
    assert acc2.scaler.state_dict()["scale"] == 512.0


def test_a_loader_that_was_not_prepared_is_refused(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    acc, _, _ = _setup(0)
    with (
        CkptkitAccelerate(acc, str(tmp_path / "run")) as ck,
        pytest.raises(ckptkit.ConfigError, match=r"accelerator\.prepare"),
    ):
        ck.loader(torch.utils.data.DataLoader(range(4)))


def test_missing_accelerate_is_a_one_line_install_hint() -> None:
    code = (
        "import sys; sys.modules['accelerate'] = None\n"
        "import ckptkit, ckptkit.manager\n"
        "try:\n"
        "    import ckptkit.integrations.accelerate\n"
        "except ckptkit.MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().count("\n") == 0
    assert "pip install 'ckptkit[accelerate]'" in out.stdout


def test_core_does_not_import_accelerate() -> None:
    code = "import sys, ckptkit, ckptkit.manager; print('accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _plain_accelerate_run(tmp_path: Path, stop: int | None, steps: int) -> dict:
    """The example's loop with accelerate's own save_state/load_state and the documented
    ``skip_first_batches`` resume (no ckptkit), stopped after ``stop`` steps and resumed."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    def build():
        acc = Accelerator(cpu=True)
        set_seed(0)
        x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True
        )
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return (acc, *acc.prepare(model, opt, data))

    def train(acc, model, opt, data, step: int, until: int) -> int:
        skip = step % len(data)
        while step < until:
            loader = acc.skip_first_batches(data, skip) if skip else data
            skip = 0
            for xb, yb in loader:
                acc.backward((model(xb).sum(1, keepdim=True) - yb).square().mean())
                opt.step()
                opt.zero_grad()
                step += 1
                if step >= until:
                    return step
        return step

    acc, model, opt, data = build()
    train(acc, model, opt, data, 0, stop or steps)
    if stop is not None:
        acc.save_state(str(tmp_path / "own"))
        acc, model, opt, data = build()
        acc.load_state(str(tmp_path / "own"))
        data.iteration = stop // len(data)
        train(acc, model, opt, data, stop, steps)
    return {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def test_accelerates_own_resume_mid_epoch_differs(tmp_path: Path) -> None:
    """Why the loader snapshot exists (docs/INTEGRATIONS.md): accelerate's own resume,
    with the RNG of the moment of the save, reshuffles the resumed epoch."""
    straight = _plain_accelerate_run(tmp_path, None, 13)
    assert _equal(straight, _plain_accelerate_run(tmp_path / "b", None, 13))  # deterministic
    assert _equal(straight, _plain_accelerate_run(tmp_path / "c", 10, 13))  # at an epoch end
    assert not _equal(straight, _plain_accelerate_run(tmp_path / "d", 12, 13))  # mid-epoch


def test_set_epoch_to_another_epoch_drops_the_resumed_position(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    url = str(tmp_path / "run")
    acc, objs, counter = _setup(0, batches=4)
    with CkptkitAccelerate(acc, url) as ck:
        loader = ck.loader(objs[-1])
        it = iter(loader)
        next(it), next(it), next(it)
        ck.save(3)
    acc2, objs2, _ = _setup(0, batches=4)
    with CkptkitAccelerate(acc2, url) as ck:
        ck.resume()
        loader = ck.loader(objs2[-1])
        assert len(list(loader)) == 1  # the resumed epoch: its last batch only
        loader.set_epoch(5)
        assert len(list(loader)) == 4  # epoch 5 (and its position) starts from the first batch
        assert objs2[-1].iteration == 6


def test_a_signal_saves_and_stops_with_the_resumable_exit_code(tmp_path: Path) -> None:
    import os
    import signal

    from ckptkit.integrations.accelerate import CkptkitAccelerate

    acc, objs, counter = _setup(0)
    with CkptkitAccelerate(acc, str(tmp_path / "run"), handle_signals=True) as ck:
        assert ck.maybe_save(1) is None and not ck.should_stop
        os.kill(os.getpid(), signal.SIGUSR1)
        info = ck.maybe_save(2)
        assert info is not None and info.step == 2
        assert ck.should_stop and ck.stop_reason == "SIGUSR1"
        assert ck.exit_code == ckptkit.EXIT_RESUMABLE


@pytest.mark.parametrize(
    ("part", "value", "match"),
    [
        ("dataloader", {"iteration": 0, "batches": 9, "length": 4, "epoch_rng": None}, "batch 9"),
        ("dataloader", {"iteration": -1, "batches": 0, "length": 4}, "iteration=-1"),
        ("dataloader", {"iteration": 0, "batches": 1, "length": 4, "epoch_rng": [7]}, "epoch_rng"),
        ("accelerator", {"step": "x"}, "step='x'"),
        ("rng", {"ranks": []}, "per-process"),
    ],
)
def test_a_damaged_part_is_refused_before_anything_loads(
    tmp_path: Path, part: str, value: dict, match: str
) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    url = str(tmp_path / "run")
    acc, objs, counter = _setup(0)
    _train(acc, objs, counter, 1)
    with CkptkitAccelerate(acc, url) as ck:
        saved = ckptkit.load(ck.save(1).url)
        saved[part] = value
        ck.manager.save(2, saved)
    acc2, objs2, counter2 = _setup(1)
    before = {k: v.clone() for k, v in objs2[0].state_dict().items()}
    with (
        CkptkitAccelerate(acc2, url) as ck,
        pytest.raises(ckptkit.IncompatibleCheckpointError, match=match),
    ):
        ck.resume()
    assert _equal(objs2[0].state_dict(), before) and counter2.n == 0


def test_inspect_sees_the_rng_and_loader_position(tmp_path: Path) -> None:
    from ckptkit.integrations.accelerate import CkptkitAccelerate

    acc, objs, counter = _setup(0)
    with CkptkitAccelerate(acc, str(tmp_path / "run")) as ck:
        info = ck.save(1)
    lacks = " ".join(ckptkit.inspect(info.url)["lacks"])
    assert "RNG" not in lacks and "data-loader" not in lacks
    assert "optimizer" not in lacks and "scheduler" not in lacks
