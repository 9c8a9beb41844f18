"""Sharded state and world-size changes without torchrun: the ``dcp/`` sub-folder of a
checkpoint, its manifest rules, and the data position mapped between world sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import ckptkit
from ckptkit.manifest import Manifest


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return model, opt


def test_sharded_state_is_a_dcp_folder_committed_by_the_manifest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, opt = tiny()
    run = str(tmp_path / "run")
    with ckptkit.CheckpointManager(run) as mgr:
        info = mgr.save(3, {"app": ckptkit.ShardedState(model, opt), "step": 3})
    manifest = info.manifest
    assert manifest.entries["app"] == "dcp/" and manifest.layouts == {"dcp/": "dcp"}
    assert {"dcp/.metadata", "dcp/__0_0.distcp"} <= set(manifest.files)
    torch.manual_seed(1)
    other, other_opt = tiny()
    with ckptkit.CheckpointManager(run) as mgr:
        assert mgr.restore({"app": ckptkit.ShardedState(other, other_opt)}).step == 3
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])  # fmt: skip
    assert other_opt.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again
    assert not any("optimizer" in gap for gap in ckptkit.inspect(run)["lacks"])
    # The shards are checked like any file: one flipped byte and the checkpoint is skipped.
    shard = Path(info.url) / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1
    shard.write_bytes(bytes(data))
    with ckptkit.CheckpointManager(run) as mgr, pytest.warns(ckptkit.CheckpointWarning):
        assert mgr.latest() is None


def test_a_shape_mismatch_is_refused_before_anything_loads(tmp_path: Path) -> None:
    model, opt = tiny()
    run = str(tmp_path / "run")
    with ckptkit.CheckpointManager(run) as mgr:
        mgr.save(1, {"app": ckptkit.ShardedState(model, opt)})
    wider = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    with ckptkit.CheckpointManager(run) as mgr, pytest.raises(ckptkit.IncompatibleCheckpointError, match="shape"):  # fmt: skip
        mgr.restore({"app": ckptkit.ShardedState(wider)})


def manifest(files: dict, entries: dict, layouts: dict | None = None) -> bytes:
    entry = {"size": 1, "xxh3": "0" * 32}
    raw = {"format": "ckptkit/2", "step": 1, "files": dict.fromkeys(files, entry),
           "entries": entries, "epoch": None, "metrics": {}, "is_best": False, "created": 1.0,
           "config": None, "config_hash": None, "metadata": {}, "versions": {}}  # fmt: skip
    if layouts is not None:
        raw["layouts"] = layouts
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("files", "entries", "layouts", "problem"),
    [
        (["dcp/a"], {"x": "dcp/"}, None, "has no layout"),  # a folder no layout names
        (["dcp/a", "state.json"], {"x": "state.json"}, None, "no entry names"),
        pytest.param(["dcp/a/b"], {"x": "dcp/"}, {"dcp/": "dcp"}, "sub-folder"),  # two levels
        pytest.param(["dcp/../a"], {"x": "dcp/"}, {"dcp/": "dcp"}, "unsafe"),
        pytest.param(["other/a"], {"x": "dcp/"}, {"dcp/": "dcp"}, "lists no file"),
        # (an unknown layout name parses: reading it says "upgrade ckptkit", test_native2.py)
        pytest.param(["dcp/a"], {"x": "dcp/"}, {"../": "dcp"}, "no entry names"),
        pytest.param(["dcp/a"], {"x": "dcp/"}, {"dcp": "dcp"}, "no entry names"),
        pytest.param(
            ["dcp/a", "state.json"], {"x": "state.json"}, {"dcp/": "dcp"}, "no entry names"
        ),
    ],
)
def test_sub_folders_only_as_layouts_name_them(
    files: list, entries: dict, layouts: dict | None, problem: str
) -> None:
    with pytest.raises(ckptkit.CorruptCheckpointError, match=problem):
        Manifest.from_bytes(manifest(files, entries, layouts), "m")


def test_a_manifest_without_sub_folders_has_no_layouts_field() -> None:
    good = Manifest.from_bytes(manifest(["dcp/a", "dcp/.metadata"], {"x": "dcp/", "y": "dcp/"}, {"dcp/": "dcp"}), "m")  # fmt: skip
    assert Manifest.from_bytes(good.to_bytes(), "m").layouts == {"dcp/": "dcp"}
    plain = Manifest.from_bytes(manifest(["state.json"], {"x": "state.json"}), "m")
    assert "layouts" not in json.loads(plain.to_bytes())


class Indices(Dataset):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize(("old", "new", "done"), [(2, 1, 3), (1, 2, 5), (1, 2, 6), (3, 2, 2)])
def test_a_position_maps_by_samples_consumed(old: int, new: int, done: int) -> None:
    """Batches consumed at the old world size plus those left at the new one cover the
    epoch's samples (each at least once, the seen-again remainder reported)."""
    from ckptkit.state.dataloader import remap_state

    def loaders(world: int) -> list[ckptkit.ResumableDataLoader]:
        return [ckptkit.ResumableDataLoader(Indices(), batch_size=2, shuffle=True, seed=3, rank=r, world_size=world, drop_last=True) for r in range(world)]  # fmt: skip

    seen: list[int] = []
    for loader in loaders(old):
        batches = iter(loader)
        for _ in range(done):
            seen += next(batches).tolist()
    saved = loaders(old)[0]
    saved.load_state_dict({**saved.state_dict(), "batches_yielded": done})
    rest: list[int] = []
    for loader in loaders(new):
        state, note = remap_state(saved.state_dict(), loader)
        assert note is not None and f"world_size={old}" in note
        loader.load_state_dict(state)
        rest += [i for batch in loader for i in batch.tolist()]
    usable = (50 // new) // 2 * 2 * new  # what one epoch at the new world size visits
    assert set(seen) | set(rest) >= set(ckptkit.ResumableDataLoader(Indices(), batch_size=2, shuffle=True, seed=3, drop_last=True)._rank_order(0)[:usable].tolist())  # fmt: skip
    again = len(seen) + len(rest) - len(set(seen) | set(rest))
    assert again == (0 if "seen again" not in note else int(note.rsplit("last ", 1)[1].split()[0]))


@pytest.mark.parametrize("where", ["memory", pytest.param("gs", marks=pytest.mark.gcs)])
def test_sharded_state_at_a_remote_url(where: str, request: pytest.FixtureRequest) -> None:
    """The shards go through the run's own storage: any URL, here fsspec's memory:// and
    gs:// (the real emulator: manifest-last commit, no rename)."""
    import uuid

    torch.manual_seed(0)
    model, opt = tiny()
    if where == "gs":
        run = f"gs://{request.getfixturevalue('gcs_bucket')}/run"
    else:
        run = f"memory://ckptkit-dist-{uuid.uuid4().hex[:8]}/run"
    with ckptkit.CheckpointManager(run) as mgr:
        mgr.save(2, {"app": ckptkit.ShardedState(model, opt)})
    other, other_opt = tiny()
    with ckptkit.CheckpointManager(run) as mgr:
        assert mgr.restore({"app": ckptkit.ShardedState(other, other_opt)}).step == 2
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True)
    )
    assert sorted(ckptkit.load(run)["app"]["model"]) == sorted(model.state_dict())
