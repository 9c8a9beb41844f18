"""Format ``ckptkit/2``: xxh3-128 per file, every tensor streamed into safetensors-
compatible files, a small JSON state tree, one read path that reads straight into fresh
tensors, room for later layouts, and hostile files refused as corrupt."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import xxhash
from safetensors import safe_open

import ckptkit
from ckptkit import (
    CheckpointManager,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    RNGState,
)
from ckptkit.manifest import MANIFEST


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 3)
        self.out = torch.nn.Linear(3, 7, bias=False)
        self.out.weight = self.emb.weight


def training_state() -> dict:
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.out(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    return {
        "model": model,
        "optimizer": opt,
        "rng": RNGState(),
        "extra": {
            "nested": [torch.arange(6).view(2, 3).t(), {"deep": torch.ones(2, dtype=torch.bool)}],
            "tup": (1, 2.5, None, "s", b"\x00\x01"),
            "bf16": torch.randn(4, 5).to(torch.bfloat16)[:, 1:3],
            "scalar": torch.tensor(3.0),
            "empty": torch.zeros(0, 4),
            "int_keys": {0: torch.full((2,), 7, dtype=torch.int8), 1: float("nan")},
        },
    }


def save(tmp_path, state=None, url=None) -> tuple[str, str]:
    run = url or str(tmp_path / "run")
    with CheckpointManager(run, keep_last=None) as mgr:
        info = mgr.save(5, state or training_state())
    return run, info.url


def manifest_of(ckpt: str) -> dict:
    with open(os.path.join(ckpt, MANIFEST)) as f:
        return json.load(f)


def rewrite_manifest(ckpt: str, change=None) -> None:
    """Apply ``change`` to the manifest, then record every listed file's true size and
    xxh3: the damage is then only what a structural check can find."""
    raw = manifest_of(ckpt)
    if change:
        change(raw)
    for name in raw["files"]:
        try:
            with open(os.path.join(ckpt, name), "rb") as f:
                data = f.read()
        except OSError:  # a name outside the checkpoint: never read by the reader
            data = b"x"
        raw["files"][name] = {"size": len(data), "xxh3": xxhash.xxh3_128_hexdigest(data)}
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(raw, f)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


# -- 1. the format -------------------------------------------------------------------
def test_manifest_is_format_2_with_xxh3(tmp_path):
    _, ckpt = save(tmp_path)
    raw = manifest_of(ckpt)
    assert raw["format"] == "ckptkit/2"
    for name, entry in raw["files"].items():
        assert set(entry) == {"size", "xxh3"}
        with open(os.path.join(ckpt, name), "rb") as f:
            assert entry["xxh3"] == xxhash.xxh3_128_hexdigest(f.read())


def test_newer_format_says_upgrade(tmp_path):
    run, ckpt = save(tmp_path)
    raw = manifest_of(ckpt)
    raw["format"] = "ckptkit/3"
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(raw, f)
    with pytest.raises(IncompatibleCheckpointError, match=r"newer ckptkit.*pip install -U"):
        ckptkit.load(ckpt)
    with pytest.raises(IncompatibleCheckpointError, match="upgrade ckptkit"):
        CheckpointManager(run).restore(training_state())


def _add_layout(ckpt: str, layout: str = "dcp-from-the-future") -> None:
    os.mkdir(os.path.join(ckpt, "dcp"))
    with open(os.path.join(ckpt, "dcp", "__0_0.distcp"), "wb") as f:
        f.write(b"shard bytes")

    def change(raw):
        raw["files"]["dcp/__0_0.distcp"] = {}
        raw["entries"]["sharded"] = "dcp/"
        raw["layouts"] = {"dcp/": layout}

    rewrite_manifest(ckpt, change)


def test_unknown_layout_is_refused_with_upgrade_hint(tmp_path):
    _, ckpt = save(tmp_path)
    _add_layout(ckpt)
    with pytest.raises(IncompatibleCheckpointError, match="upgrade ckptkit"):
        ckptkit.load(ckpt)


def test_sub_folder_files_are_verified_like_any_file(tmp_path):
    _, ckpt = save(tmp_path)
    _add_layout(ckpt)
    with open(os.path.join(ckpt, "dcp", "__0_0.distcp"), "r+b") as f:
        f.write(b"S")
    [result] = ckptkit.reader.verify(ckpt)
    assert not result["ok"] and "dcp/__0_0.distcp" in result["problem"]


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: raw["files"].update({"a/b/c.bin": {}}),  # two sub-folder levels
        lambda raw: raw["files"].update({"../x.bin": {}}),
        lambda raw: raw["entries"].update({"k": "nofolder/"}),  # a folder nothing lies in
        lambda raw: raw.update({"layouts": {"dcp/": 3}}),
        lambda raw: raw["files"].update({"x.bin": {}}),  # a stray file no entry names
    ],
)
def test_manifest_layout_fields_stay_strict(tmp_path, change):
    _, ckpt = save(tmp_path)
    os.makedirs(os.path.join(ckpt, "a", "b"))
    for name in ("a/b/c.bin", "x.bin"):
        with open(os.path.join(ckpt, name), "wb") as f:
            f.write(b"x")
    with open(os.path.join(tmp_path, "run", "x.bin"), "wb") as f:
        f.write(b"x")
    rewrite_manifest(ckpt, change)
    with pytest.raises(CorruptCheckpointError, match="manifest"):
        ckptkit.load(ckpt)


# -- 2. the streaming writer ------------------------------------------------------------
def test_every_tensor_lies_in_a_safetensors_file(tmp_path):
    state = training_state()
    _, ckpt = save(tmp_path, state)
    files = manifest_of(ckpt)["files"]
    assert "state.pt" not in files
    tensor_files = [n for n in files if n.endswith(".safetensors")]
    assert {"model.safetensors", "optimizer.safetensors"} <= set(tensor_files)
    meta = [n for n in files if not n.endswith(".safetensors")]
    assert meta == ["state.json"] and files["state.json"]["size"] < 64 << 10
    with safe_open(os.path.join(ckpt, "optimizer.safetensors"), "pt") as f:
        exp_avg = state["optimizer"].state_dict()["state"][0]["exp_avg"]
        assert any(torch.equal(f.get_tensor(k), exp_avg) for k in f.keys())  # noqa: SIM118
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb.weight"]  # the tied weight: written once
    loaded = ckptkit.load(ckpt)
    assert loaded["model"]["out.weight"] is loaded["model"]["emb.weight"]
    expect = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    for key in ("model", "optimizer", "extra"):
        assert equal(expect[key], loaded[key]), key


def test_round_trip_restores_training(tmp_path):
    run, _ = save(tmp_path)
    fresh = training_state()
    fresh["optimizer"] = torch.optim.AdamW(fresh["model"].parameters(), lr=0.1)
    with CheckpointManager(run) as mgr:
        assert mgr.restore(fresh).step == 5
    assert equal(fresh["optimizer"].state_dict(), training_state()["optimizer"].state_dict())


def test_memory_storage_round_trip(tmp_path):
    url = f"memory://native2-{os.getpid()}/run"
    _, ckpt = save(tmp_path, url=url)
    assert equal(ckptkit.load(ckpt)["extra"], training_state()["extra"])


PEAK = """
import sys, torch
from ckptkit import CheckpointManager
run = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(36)])  # ~151 MB
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 1024)).sum().backward(); opt.step()  # + ~302 MB of moments
opt.zero_grad(set_to_none=True)
state = {"model": model, "optimizer": opt, "t": model[0].weight.t()}
with CheckpointManager(run + "/warm", keep_last=None) as m:  # imports, caches
    m.save(0, {"x": torch.ones(4)})
size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the RSS now
    f.write("5")
before = status("VmRSS")
with CheckpointManager(run + "/big", keep_last=None) as m:
    m.save(1, state)
after = status("VmHWM")
print(size, after - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_of_a_save_is_bounded(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    size, growth = map(int, out.stdout.split())
    assert size > 300 << 20
    assert growth <= max(64 << 20, size // 20), f"peak RSS grew {growth >> 20} MiB"


# -- 3. the reader: hostile tensor files -------------------------------------------------
def _header(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: str, header: dict, body: bytes, n: int | None = None) -> None:
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if n is None else n) + text + body)


def _hostile(tmp_path, edit) -> str:
    _, ckpt = save(tmp_path)
    path = os.path.join(ckpt, "optimizer.safetensors")
    header, body = _header(path)
    edit(path, header, body)
    rewrite_manifest(ckpt)
    return ckpt


def _tensors(header: dict) -> list[str]:
    return sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )


def _lie_offsets(path, header, body):
    last = _tensors(header)[-1]
    header[last]["data_offsets"][1] += 4
    _write_header(path, header, body)


def _lie_dtype(path, header, body):
    header[_tensors(header)[0]]["dtype"] = "F128"
    _write_header(path, header, body)


def _lie_shape(path, header, body):
    name = next(k for k in _tensors(header) if header[k]["shape"])
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    _write_header(path, header, body)


def _overlap(path, header, body):
    a, b = [
        k for k in _tensors(header) if header[k]["data_offsets"][1] > header[k]["data_offsets"][0]
    ][:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    _write_header(path, header, body)


def _huge_header(path, header, body):
    _write_header(path, header, body, n=1 << 40)


def _truncated_body(path, header, body):
    _write_header(path, header, body[:-3])


@pytest.mark.parametrize(
    "edit", [_lie_offsets, _lie_dtype, _lie_shape, _overlap, _huge_header, _truncated_body]
)
@pytest.mark.parametrize("verify", [True, False])
def test_hostile_tensor_file_is_corrupt(tmp_path, edit, verify):
    ckpt = _hostile(tmp_path, edit)
    with pytest.raises(CorruptCheckpointError, match="optimizer.safetensors"):
        ckptkit.load(ckpt, verify=verify)


def _edit_tree(ckpt: str, edit) -> None:
    path = os.path.join(ckpt, "state.json")
    with open(path) as f:
        tree = json.load(f)
    text = edit(json.dumps(tree))
    with open(path, "w") as f:
        f.write(text)
    rewrite_manifest(ckpt)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace(
            '"model.safetensors", "emb.weight"', '"model.safetensors", "nope"'
        ),  # a missing tensor
        lambda t: t.replace('{"tuple"', '{"global": "os.system", "tuple"', 1),
        lambda t: t.replace('{"tuple"', '{"pickle"', 1),  # an unknown kind of value
        lambda t: t[:-5],  # not JSON
    ],
)
def test_hostile_state_tree_is_corrupt(tmp_path, edit):
    _, ckpt = save(tmp_path)
    _edit_tree(ckpt, edit)
    with pytest.raises(CorruptCheckpointError, match="state.json"):
        ckptkit.load(ckpt)


def test_file_truncated_after_open_is_corrupt_not_a_crash(tmp_path):
    from ckptkit.storage.registry import open_storage

    _, ckpt = save(tmp_path)
    path = os.path.join(ckpt, "optimizer.safetensors")
    member = open_storage(ckpt).open_member("optimizer.safetensors", size=os.path.getsize(path))
    os.truncate(path, os.path.getsize(path) // 2)  # after the size was checked
    buf = bytearray(member.size)
    with member, pytest.raises(CorruptCheckpointError, match="shrank"):
        member.readinto(0, memoryview(buf))


def test_large_non_contiguous_and_sliced_tensors_round_trip(tmp_path):
    base = torch.randn(1536, 3000)  # 18 MB: converted in bounded pieces, row by row
    state = {"w": {"t": base.t(), "cols": base[:, ::7], "tail": base[1000:], "flat": base}}
    _, ckpt = save(tmp_path, state)
    loaded = ckptkit.load(ckpt)["w"]
    assert all(torch.equal(loaded[k], v) for k, v in state["w"].items())
    assert loaded["t"].is_contiguous()


@pytest.mark.gcs
def test_gcs_save_streams_in_parts_and_restores(gcs_bucket, monkeypatch):
    """A gs:// save: tensor files streamed as resumable uploads (several at once), parts
    cut across tensor boundaries, every byte back."""
    from ckptkit.storage.fsspec_backend import MIN_PART, FsspecStorage

    monkeypatch.setattr(FsspecStorage, "part_size", 2 * MIN_PART)
    torch.manual_seed(1)
    state = {
        "model": {"a": torch.randn(700, 300), "b": torch.randn(13)},
        "ema": {"a": torch.randn(300, 700).t()},
        "opt": {"m": [torch.randn(1000, 100), torch.arange(10)]},
    }
    url = f"gs://{gcs_bucket}/run"
    with CheckpointManager(url, keep_last=None) as mgr:
        info = mgr.save(1, state)
    assert {"model.safetensors", "ema.safetensors", "opt.safetensors"} <= set(info.manifest.files)
    loaded = ckptkit.load(info.url)
    assert equal(loaded, state)


def _deep(text: str) -> str:
    tree = json.loads(text)
    value = tree["entries"]["extra"]
    for _ in range(900):  # parses, but deeper than a recursive decoder can go
        value = [value]
    tree["entries"]["extra"] = value
    return json.dumps(tree)


def test_deeply_nested_state_tree_is_corrupt_not_a_crash(tmp_path):
    _, ckpt = save(tmp_path)
    _edit_tree(ckpt, _deep)
    with pytest.raises(CorruptCheckpointError, match="state.json"):
        ckptkit.load(ckpt)


def test_an_empty_tensor_of_impossible_shape_is_corrupt(tmp_path):
    _, ckpt = save(tmp_path)
    path = os.path.join(ckpt, "extra.safetensors")
    header, body = _header(path)
    empty = next(k for k in _tensors(header) if 0 in header[k]["shape"])
    header[empty]["shape"] = [0, 10**30]
    _write_header(path, header, body)
    rewrite_manifest(ckpt)
    with pytest.raises(CorruptCheckpointError, match="extra.safetensors"):
        ckptkit.load(ckpt)


def test_an_empty_state_saves_and_restores(tmp_path):
    run = str(tmp_path / "run")
    with CheckpointManager(run) as mgr:
        info = mgr.save(1, {})
        assert info.manifest.files == {}
        assert mgr.restore({}).step == 1


def test_object_store_uploads_a_checkpoints_files_in_parallel(monkeypatch):
    """On an object store (marker commit) the files of one save are uploaded at once: two
    uploads must meet at a barrier, which a one-by-one commit never reaches."""
    import threading

    from ckptkit.storage.fsspec_backend import FsspecStorage

    barrier = threading.Barrier(2, timeout=30)
    real = FsspecStorage.write_stream

    def meeting(self, key, chunks, size=None):
        if key.endswith(".safetensors"):
            barrier.wait()
        return real(self, key, chunks, size)

    monkeypatch.setattr(FsspecStorage, "write_stream", meeting)
    url = f"memory://parallel-{os.getpid()}/run"
    state = {"a": {"x": torch.ones(3)}, "b": {"y": torch.zeros(2)}}
    with CheckpointManager(url, keep_last=None) as mgr:
        info = mgr.save(1, state)
    assert equal(ckptkit.load(info.url), state)


def _many_tensors() -> dict:
    # Small tensors (hashed in batches) around big ones (hashed piece by piece).
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: several read pieces
    small = {f"b{i}": torch.full((7 + i,), float(i)) for i in range(40)}
    return {"model": {"first": big, **small, "last": big + 1, "tail": torch.ones(3)}}


@pytest.mark.parametrize("where", ["header", "small", "big", "last byte"])
def test_one_flipped_byte_anywhere_fails_verification(tmp_path, where):
    """The hash covers every byte in file order, whichever thread computes it: one flipped
    byte in the header, a small tensor, a big one or the last byte is caught, and no
    hashing thread outlives the failed restore."""
    import threading

    _, ckpt = save(tmp_path, _many_tensors())
    path = os.path.join(ckpt, "model.safetensors")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    at = {
        "header": 8 + n - 1,  # the padding after the header's JSON
        "small": 8 + n + header["b20"]["data_offsets"][0] + 1,
        "big": 8 + n + header["last"]["data_offsets"][0] + (5 << 20),
        "last byte": len(data) - 1,
    }[where]
    data[at] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    before = threading.active_count()
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: (xxh3|not valid)"):
        ckptkit.load(ckpt)
    assert threading.active_count() == before
    if where == "header":
        return
    assert ckptkit.load(ckpt, verify=False)["model"]["b0"].tolist() == [0.0] * 7


def test_many_tensors_round_trip_byte_for_byte(tmp_path):
    state = _many_tensors()
    _, ckpt = save(tmp_path, state)
    back = ckptkit.load(ckpt)["model"]
    assert set(back) == set(state["model"])
    assert all(torch.equal(back[k], v) for k, v in state["model"].items())
