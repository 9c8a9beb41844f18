"""ckptkit.TrainableOnly: checkpoints of a model's trainable part, refused on other frozen
weights (issue 12, item 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ckptkit


class LoRALinear(nn.Module):
    """A frozen base layer plus a small trainable low-rank adapter."""

    def __init__(self, d: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, d) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(d, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


class Net(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.embed.requires_grad_(False)
        self.block = LoRALinear(d)
        self.norm = nn.BatchNorm1d(d)  # trainable affine + buffers that change
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(x))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _train(model: Net, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_trainable_parameters_and_buffers_are_saved(tmp_path: Path) -> None:
    model = _net()
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(1, {"model": ckptkit.TrainableOnly(model)})
        url = mgr.latest().url
    saved = ckptkit.load(url)["model"]
    buffers = {n for n, _ in model.named_buffers()}
    assert set(saved["tensors"]) == _trainable_names(model) | buffers
    assert not [k for k in saved["tensors"] if k.startswith(("embed.", "block.base."))]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert set(saved["frozen"]["params"]) == frozen
    # The frozen weights are not on disk: the checkpoint is smaller than them.
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    on_disk = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
    assert on_disk < frozen_bytes


def test_changed_frozen_weights_are_refused_naming_them_and_nothing_changes(
    tmp_path: Path,
) -> None:
    model = _net()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, opt, 3, seed=1)
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(3, {"model": ckptkit.TrainableOnly(model), "optimizer": opt})

    other = _net(seed=0)
    with torch.no_grad():
        other.block.base.weight.add_(1e-3)  # another base model, same shapes
    other_opt = torch.optim.Adam([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    mgr = ckptkit.CheckpointManager(str(tmp_path / "run"))
    with mgr, pytest.raises(ckptkit.IncompatibleCheckpointError) as err:
        mgr.resume({"model": ckptkit.TrainableOnly(other), "optimizer": other_opt}, "latest")
    msg = str(err.value)
    assert "block.base.weight" in msg and "embed.weight" not in msg and "\n" not in msg
    assert "check_frozen=False" in msg
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert other_opt.state_dict()["state"] == {}


def test_a_different_trainable_set_is_refused(tmp_path: Path) -> None:
    model = _net()
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(1, {"model": ckptkit.TrainableOnly(model)})
    other = _net()
    other.head.requires_grad_(False)  # frozen here, trainable in the checkpoint
    mgr = ckptkit.CheckpointManager(str(tmp_path / "run"))
    with mgr, pytest.raises(ckptkit.IncompatibleCheckpointError, match="head.weight"):
        mgr.resume({"model": ckptkit.TrainableOnly(other)}, "latest")


def test_check_frozen_false_loads_on_other_frozen_weights(tmp_path: Path) -> None:
    model = _net()
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(1, {"model": ckptkit.TrainableOnly(model)})
    other = _net(seed=5)
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.resume({"model": ckptkit.TrainableOnly(other, check_frozen=False)}, "latest")
    assert torch.equal(other.head.weight, model.head.weight)
    assert not torch.equal(other.embed.weight, model.embed.weight)


def test_fingerprint_is_not_recomputed_per_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptkit.state.trainable as trainable_mod

    hashed: list[int] = []
    real = trainable_mod._tensor_digest

    def counting(t: torch.Tensor) -> str:
        hashed.append(t.numel())
        return real(t)

    monkeypatch.setattr(trainable_mod, "_tensor_digest", counting)
    model = _net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped = ckptkit.TrainableOnly(model)
    with ckptkit.CheckpointManager(str(tmp_path / "run"), keep_last=10) as mgr:
        for step in range(1, 4):
            _train(model, opt, 1, seed=step)
            mgr.save(step, {"model": wrapped})
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert len(hashed) == len(frozen)  # once each, over three saves
        # A frozen weight changed in place is noticed (and only it is hashed again).
        with torch.no_grad():
            model.embed.bias.add_(1.0)
        mgr.save(4, {"model": wrapped})
        urls = {c.step: c.url for c in mgr.list()}
    assert len(hashed) == len(frozen) + 1
    first = ckptkit.load(urls[1])["model"]["frozen"]
    last = ckptkit.load(urls[4])["model"]["frozen"]
    assert first["params"]["embed.bias"] != last["params"]["embed.bias"]
    assert first["digest"] != last["digest"]


def test_lora_like_model_resumes_bit_identically(tmp_path: Path) -> None:
    def run(steps: list[int], root: Path) -> Net:
        model = _net()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        state = {"model": ckptkit.TrainableOnly(model), "optimizer": opt}
        with ckptkit.CheckpointManager(str(root)) as mgr:
            done = mgr.resume(state, "auto").step or 0
            for step in range(done + 1, done + 1 + steps.pop(0)):
                _train(model, opt, 1, seed=step)
                mgr.save(step, state)
        return model

    whole = run([6], tmp_path / "whole")
    run([3], tmp_path / "parts")
    resumed = run([3], tmp_path / "parts")  # a fresh process's model: same seed, same base
    want, got = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_flat_trainable_dict_loads_and_a_whole_model_state_dict_is_refused() -> None:
    model, other = _net(), _net(seed=3)
    flat = {k: v.clone() for k, v in ckptkit.TrainableOnly(model).trainable_tensors().items()}
    ckptkit.TrainableOnly(other).load_state_dict(flat)  # the old Time-LLM layout
    assert torch.equal(other.head.weight, model.head.weight)
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="unexpected .*embed.weight"):
        ckptkit.TrainableOnly(other).load_state_dict(model.state_dict())
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="TrainableOnly did not write"):
        ckptkit.TrainableOnly(other).load_state_dict({"format": "something else", "x": 1})


def test_other_shapes_are_refused_and_nothing_changes() -> None:
    saved = ckptkit.TrainableOnly(_net()).state_dict()
    saved["tensors"]["head.weight"] = torch.zeros(2, 64)
    other = _net(seed=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match=r"head.weight \(2, 64\)"):
        ckptkit.TrainableOnly(other).load_state_dict(saved)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_frozen_bfloat16_and_scalar_weights_are_fingerprinted() -> None:
    model = _net()
    model.register_parameter("scale", nn.Parameter(torch.tensor(2.0), requires_grad=False))
    model.embed.to(torch.bfloat16)
    saved = ckptkit.TrainableOnly(model).state_dict()
    assert {"scale", "embed.weight"} <= set(saved["frozen"]["params"])
    with torch.no_grad():
        model.scale.fill_(3.0)
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match=r"changed: scale\b"):
        ckptkit.TrainableOnly(model).check_state_dict(saved)
    model.embed.weight.data = model.embed.weight.data.clone() + 1  # a replaced tensor
    wrapped = ckptkit.TrainableOnly(model)
    digest = wrapped.frozen_fingerprint()["params"]["embed.weight"]
    model.embed.weight.data = model.embed.weight.data.clone() + 1
    assert wrapped.frozen_fingerprint()["params"]["embed.weight"] != digest


def test_manager_trainable_only_wraps_every_model(tmp_path: Path) -> None:
    model = _net()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, opt, 2, seed=1)
    state = {"model": model, "optimizer": opt, "step": 2}
    with ckptkit.CheckpointManager(str(tmp_path / "run"), trainable_only=True) as mgr:
        mgr.save(2, state)
        mgr.save(3, state)
        url = mgr.latest().url
    assert state["model"] is model
    saved = ckptkit.load(url)["model"]
    assert set(saved["tensors"]) == set(ckptkit.TrainableOnly(model).trainable_tensors())

    other = _net()
    with torch.no_grad():
        other.embed.weight.mul_(2)
    other_state = {"model": other, "step": 0}
    mgr = ckptkit.CheckpointManager(str(tmp_path / "run"), trainable_only=True)
    with mgr, pytest.raises(ckptkit.IncompatibleCheckpointError, match="changed: embed.weight"):
        mgr.resume(other_state, "latest")
    assert other_state == {"model": other, "step": 0}

    fresh = _net()
    fresh_state = {"model": fresh, "step": 0}
    with ckptkit.CheckpointManager(str(tmp_path / "run"), trainable_only=True) as mgr:
        assert mgr.resume(fresh_state, "latest").step == 3
    assert fresh_state["model"] is fresh and fresh_state["step"] == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
