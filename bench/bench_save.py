"""What ckptkit's safety costs: ``CheckpointManager.save`` (local storage, rename commit,
fsync, sha256 manifest) against a bare ``torch.save`` + fsync of the same model + AdamW
state, and ``restore`` (sha256-verified, and with ``verify=False``) against
``torch.load`` + ``load_state_dict``.

Both sides run in the same process, alternating, repeated; the table reports medians
and the ratio. Run with ``python -m bench.bench_save``; writes bench/results/save.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ckptkit import CheckpointManager

RESULTS = Path(__file__).resolve().parent / "results" / "save.md"
SIZES_MB = (50, 200)


def make_state(total_mb: float) -> dict:
    """A model whose weights + AdamW moments take about ``total_mb`` MB (12 bytes per
    float32 parameter: the weight and two moments)."""
    params = int(total_mb * 1e6 / 12)
    width = 1024
    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # materialise exp_avg / exp_avg_sq
    opt.zero_grad(set_to_none=True)
    return {"model": model, "optimizer": opt, "epoch": 1}


def state_bytes(state: dict) -> int:
    tensors = list(state["model"].state_dict().values())
    for per_param in state["optimizer"].state_dict()["state"].values():
        tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_save_fsync(state: dict, path: str) -> None:
    payload = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load_into(state: dict, path: str) -> None:
    payload = torch.load(path, weights_only=True)
    state["model"].load_state_dict(payload["model"])
    state["optimizer"].load_state_dict(payload["optimizer"])
    state["epoch"] = payload["epoch"]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(total_mb: float, repeats: int, root: str) -> dict[str, float]:
    state = make_state(total_mb)
    run = os.path.join(root, f"run-{total_mb:g}")
    plain = os.path.join(root, f"plain-{total_mb:g}.pt")
    times: dict[str, list[float]] = {
        k: [] for k in ("ckptkit_save", "torch_save", "restore", "restore_noverify", "torch_load")
    }
    with CheckpointManager(run, keep_last=1, keep_best=0) as mgr:
        for i in range(repeats):
            # Alternate which goes first, so neither always meets a warm page cache.
            pair = [
                ("ckptkit_save", lambda i=i: mgr.save(i + 1, state)),
                ("torch_save", lambda: torch_save_fsync(state, plain)),
            ]
            for key, fn in pair if i % 2 == 0 else pair[::-1]:
                times[key].append(timed(fn))
            loads = [
                ("restore", lambda: mgr.restore(state)),
                ("restore_noverify", lambda: mgr.restore(state, verify=False)),
                ("torch_load", lambda: torch_load_into(state, plain)),
            ]
            for key, fn in loads if i % 2 == 0 else loads[::-1]:
                times[key].append(timed(fn))
        on_disk = mgr.latest().size
    out = {k: statistics.median(v) for k, v in times.items()}
    out["mb"] = state_bytes(state) / 1e6
    out["ckpt_mb"] = on_disk / 1e6  # data files of one checkpoint
    out["plain_mb"] = os.path.getsize(plain) / 1e6
    return out


def render(results: dict[float, dict[str, float]], repeats: int, load: float) -> str:
    lines = [
        "# Save and restore: ckptkit vs torch.save / torch.load",
        "",
        f"Model (stack of 1024x1024 Linear layers) + AdamW state, local disk, median of "
        f"{repeats} alternating runs in one process. torch {torch.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}, 1-min load average {load:.1f} at the start "
        "(other work on the machine slows both sides alike).",
        "",
        "| state (files: ckptkit / torch.save) | ckptkit save | torch.save + fsync | ratio | restore (sha256) "
        "| restore (verify=False) | torch.load + load_state_dict | ratio (sha256) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['mb']:.0f} MB ({r['ckpt_mb']:.0f} / {r['plain_mb']:.0f} MB) "
            f"| {r['ckptkit_save']:.2f} s | {r['torch_save']:.2f} s "
            f"| {r['ckptkit_save'] / r['torch_save']:.2f}x | {r['restore']:.2f} s "
            f"| {r['restore_noverify']:.2f} s | {r['torch_load']:.2f} s "
            f"| {r['restore'] / r['torch_load']:.2f}x |"
        )
    lines += [
        "",
        "ckptkit save = encode in memory (safetensors for the weights, torch.save for the "
        "optimizer), sha256 of every file, write + fsync into a temporary directory, "
        "manifest, rename, fsync of the run directory, rotation of the previous "
        "checkpoint. restore = read, size + sha256 check, safe decode, checks that the "
        "model fits, load_state_dict. The plain side does none of that: a kill during "
        "torch.save leaves a truncated file in place of the last good one.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=list(SIZES_MB), help="MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    load = os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="ckptkit-bench-", dir=args.dir)
    try:
        results = {}
        for mb in args.sizes:
            results[mb] = bench_size(mb, args.repeats, root)
            print(f"{mb:g} MB: " + ", ".join(f"{k} {v:.3f}" for k, v in results[mb].items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = render(results, args.repeats, load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
