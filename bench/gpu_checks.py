"""GPU checks, in one script: run it on a CUDA machine and commit the table it writes.

    python bench/gpu_checks.py              # on a GPU: writes bench/results/gpu.md
    python bench/gpu_checks.py --dry-run    # anywhere: every check at tiny size, on CPU
                                            # without CUDA (prints the table; --out PATH)

Checks (each reports ok / FAIL / skipped with its numbers; one failing does not stop
the others; the whole script stays within about 4 minutes on one H200):

1. ``gpt2_bf16_step``: Time-LLM on a GPT-2-small-shaped backbone (6 layers, width 768,
   vocab 50257, random weights: no pretrained weights are reachable offline) in bf16,
   the gpt2-etth1 preset's shapes: ms per training step and peak GPU memory.
2. ``cuda_rng_resume``: the tiny trainer (dropout on, so the CUDA RNG is used) under
   ``torch.use_deterministic_algorithms(True)`` with ``CUBLAS_WORKSPACE_CONFIG`` set before
   CUDA starts: a run SIGKILLed after its first checkpoint and resumed ends with the same
   weights as an uninterrupted one.
3. ``gpu_state_roundtrip``: ckptkit save/restore of GPU-resident state (weights, Adam
   moments, CUDA RNG): equal after restore, and still on the GPU.
4. ``llama_4bit_load``: a tiny Llama-shaped model loaded in 4 bit through bitsandbytes
   (skipped, saying so, when bitsandbytes is not installed).
5. ``cuda_async_save``: an async save of ~600 MB of GPU-resident weights + AdamW (device
   to host into pinned buffers on a side stream) while the loop steps on at once: data
   files byte-identical to a sync save, and ``save()`` blocking ≤ 10 % of a sync save.

It assumes no particular torch or Python version (the GPU machine has its own, not
``constraints.txt``'s) and imports ckptkit/timellm from this checkout.
"""

from __future__ import annotations

import os

# Before torch (and so CUDA) starts: cuBLAS needs it for deterministic algorithms.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import torch  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu.md"
BUDGET_S = 220.0  # leave room under the 4-minute slot for start-up and the write


@dataclass
class Mode:
    device: torch.device
    tiny: bool  # dry run: every check at tiny size

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _sync(mode: Mode) -> None:
    if mode.cuda:
        torch.cuda.synchronize()


def check_gpt2_bf16_step(mode: Mode, work: Path) -> str:
    from transformers import GPT2Config, GPT2Model

    from timellm import build_model, data_provider, get_preset
    from timellm.model import Backbone
    from timellm.model.tiny import tiny_tokenizer

    if mode.tiny:
        cfg = get_preset("tiny-cpu", seq_len=32, label_len=16, pred_len=8, batch_size=4)
        shape = {"vocab_size": 4096, "n_embd": 64, "n_layer": 2, "n_head": 4}
    else:
        cfg = get_preset("gpt2-etth1")  # seq 512 -> 96, batch 24, 6 layers
        shape = {"vocab_size": 50257, "n_embd": 768, "n_layer": 6, "n_head": 12}
    cfg = cfg.replace(dtype="bf16", llm_layers=shape["n_layer"])
    torch.manual_seed(0)
    llm = GPT2Model(GPT2Config(**shape)).to(torch.bfloat16)
    llm.config.use_cache = False
    llm.requires_grad_(False)
    backbone = Backbone(llm, tiny_tokenizer("gpt2"), "random-gpt2-shape", torch.bfloat16)
    model = build_model(cfg, backbone).to(mode.device)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    _, loader = data_provider(cfg, "train")
    batches = iter(loader)
    if mode.cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    warmup, measured = (1, 2) if mode.tiny else (3, 10)
    for i in range(warmup + measured):
        x, y, _, _ = next(batches)
        x, y = x.float().to(mode.device), y[:, -cfg.pred_len :].float().to(mode.device)
        _sync(mode)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        _sync(mode)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss {float(loss)} at step {i}")
    ms = sorted(times)[len(times) // 2] * 1e3
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if mode.cuda else ""
    layers = f"{shape['n_layer']} layers x {shape['n_embd']}, vocab {shape['vocab_size']}"
    return (
        f"{layers}, seq {cfg.seq_len}->{cfg.pred_len}, batch {cfg.batch_size}: "
        f"{ms:.1f} ms/step (median of {measured}){mem}, "
        f"{cfg.batch_size / (ms / 1e3):.0f} samples/s"
    )


_TRAIN = """
import sys, torch
torch.use_deterministic_algorithms(True)
sys.path[:0] = {paths!r}
from timellm import get_preset
from timellm.train import RunOptions, train
cfg = get_preset("tiny-cpu", seq_len=32, label_len=16, pred_len=8, batch_size=4,
                 max_steps={steps}, dropout=0.1)
opts = RunOptions(output=sys.argv[1], save_steps={save}, eval_batches=1, log_every=1,
                  progress=False, test=False)
sys.exit(train(cfg, opts, echo=lambda s: None)["exit_code"])
"""


def _trained(saved: dict) -> dict:
    """The trained tensors of a Time-LLM checkpoint's ``model`` entry: TrainableOnly's
    layout keeps them under ``tensors`` (runs saved before it hold them directly)."""
    return saved["tensors"] if "tensors" in saved and "frozen" in saved else saved


def check_cuda_rng_resume(mode: Mode, work: Path) -> str:
    import ckptkit

    # Enough steps after the first checkpoint that the kill lands mid-run on a fast GPU.
    steps, save = (6, 2) if mode.tiny else (60, 3)
    code = _TRAIN.format(paths=[str(ROOT), str(ROOT / "plugins")], steps=steps, save=save)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not mode.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""

    def start(run: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(run)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def finish(proc: subprocess.Popen[bytes]) -> None:
        _, err = proc.communicate(timeout=150)
        if proc.returncode != 0:
            raise RuntimeError(f"trainer exited {proc.returncode}: {err.decode()[-300:]}")

    finish(start(work / "ref"))
    killed = start(work / "run")
    deadline = time.monotonic() + 150
    while not _has_checkpoint(work / "run") and killed.poll() is None:
        if time.monotonic() > deadline:
            raise RuntimeError("no checkpoint within 150 s")
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    if killed.returncode == 0:
        raise RuntimeError("the run finished before the kill: nothing was resumed")
    with ckptkit.CheckpointManager(str(work / "run"), readonly=True) as mgr:
        latest = mgr.latest()
        at = f"step {latest.step}" if latest is not None else "no checkpoint"
    finish(start(work / "run"))
    ref, got = (_trained(ckptkit.load(str(work / w))["model"]) for w in ("ref", "run"))
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    if differ:
        raise RuntimeError(f"resumed weights differ from the uninterrupted run: {differ[:3]}")
    return f"{steps} steps with dropout, SIGKILL at {at}, resumed: weights bit-identical"


def _has_checkpoint(run: Path) -> bool:
    return run.is_dir() and any((p / "manifest.json").is_file() for p in run.glob("step-*"))


def check_gpu_state_roundtrip(mode: Mode, work: Path) -> str:
    import ckptkit

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)
        )
        model = model.to(mode.device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    torch.manual_seed(0)
    model, opt = make()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 64, device=mode.device)).square().mean().backward()
        opt.step()
    run = str(work / "roundtrip")
    with ckptkit.CheckpointManager(run) as mgr:
        mgr.save(3, {"model": model, "optimizer": opt, "rng": ckptkit.RNGState()})
    want = torch.randn(4, device=mode.device)  # the RNG stream right after the save
    torch.manual_seed(123)
    fresh, fresh_opt = make()
    with ckptkit.CheckpointManager(run) as mgr:
        mgr.resume({"model": fresh, "optimizer": fresh_opt, "rng": ckptkit.RNGState()}, "latest")
    got = torch.randn(4, device=mode.device)
    tensors = [*fresh.parameters(), *_tensors(fresh_opt.state_dict()["state"])]
    wrong = [t.device for t in tensors if t.device.type != mode.device.type and t.dim() > 0]
    if wrong:
        raise RuntimeError(f"restored tensors left the {mode.device.type}: {wrong[:3]}")
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    moments = all(
        torch.equal(a, b)
        for a, b in zip(
            _tensors(opt.state_dict()["state"]),
            _tensors(fresh_opt.state_dict()["state"]),
            strict=True,
        )
    )
    if not (same and moments and torch.equal(want, got)):
        raise RuntimeError(
            f"weights equal {same}, Adam state equal {moments}, RNG equal {torch.equal(want, got)}"
        )
    return f"weights, Adam moments and {mode.device.type} RNG equal after restore, on {mode.device.type}"


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    return []


def check_llama_4bit_load(mode: Mode, work: Path) -> str:
    from transformers import LlamaConfig, LlamaModel

    from timellm.model import load_backbone
    from timellm.model.tiny import tiny_tokenizer

    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if not have_bnb and not mode.tiny:
        return "skipped: bitsandbytes is not installed (pip install 'ckptkit[quant]')"
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)  # fmt: skip
    path = work / "tiny-llama"
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(**shape)).save_pretrained(path)
    tiny_tokenizer("llama").save_pretrained(path)
    quantize = "4bit" if mode.cuda and have_bnb else None
    backbone = load_backbone(str(path), 2, "bf16", quantize)
    n4 = sum(type(m).__name__ == "Linear4bit" for m in backbone.model.modules())
    embeds = torch.randn(1, 8, shape["hidden_size"], dtype=torch.bfloat16, device=mode.device)
    out = backbone.model(inputs_embeds=embeds).last_hidden_state
    if not torch.isfinite(out.float()).all():
        raise RuntimeError("non-finite output")
    if quantize is None:
        why = "bitsandbytes not installed" if not have_bnb else "4-bit needs CUDA"
        return f"dry run, loaded unquantized ({why}); forward ok"
    mem = torch.cuda.memory_allocated() / 2**20
    return f"{n4} Linear4bit layers, forward ok, {mem:.0f} MiB allocated"


def check_cuda_async_save(mode: Mode, work: Path) -> str:
    """An async save of GPU-resident state (on CUDA: device-to-host copies into pinned
    buffers kept between saves, on a side stream): its data files are byte-identical to
    a sync save of the state at ``save()`` while the loop steps on at once, and
    ``save()`` blocks for at most 10 % of a sync save."""
    import ckptkit

    width, layers = (64, 2) if mode.tiny else (2048, 12)  # ~600 MB of weights + AdamW
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    model = model.to(mode.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        model(torch.randn(8, width, device=mode.device)).square().mean().backward()
        opt.step()

    step()
    state = {"model": model, "optimizer": opt}

    def files(run: Path, step: int) -> dict[str, bytes]:
        (folder,) = [p for p in run.glob(f"step-{step:012d}*") if p.is_dir()]
        return {
            p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"
        }

    blocked, synced = [], []
    # One manager of each kind, as a run has: the first async save allocates the pinned
    # buffers, the later ones reuse them (only those are timed against the target).
    with (
        ckptkit.CheckpointManager(str(work / "sync"), run_name="r", keep_last=1) as sync_mgr,
        ckptkit.CheckpointManager(
            str(work / "async"), run_name="r", keep_last=1, async_save=True
        ) as async_mgr,
    ):
        for n in range(1, 4):
            _sync(mode)
            t = time.perf_counter()
            sync_mgr.save(n, state)
            synced.append(time.perf_counter() - t)
            _sync(mode)
            t = time.perf_counter()
            async_mgr.save(n, state)
            blocked.append(time.perf_counter() - t)
            for _ in range(3):  # the loop goes on at once: the snapshot must not see it
                step()
            async_mgr.wait()
            if files(work / "async", n) != files(work / "sync", n):
                raise RuntimeError(f"step {n}: async data files differ from a sync save")
    ratio = min(blocked[1:]) / min(synced[1:])
    if ratio > 0.10 and not mode.tiny:
        raise RuntimeError(f"save() blocked {ratio:.0%} of a sync save (target 10 %)")
    return (
        f"data files byte-identical to a sync save; save() blocked {min(blocked[1:]) * 1e3:.0f} ms "
        f"against {min(synced[1:]) * 1e3:.0f} ms for a sync save ({ratio:.0%}; target ≤ 10 %), "
        f"on {mode.device.type}"
    )


CHECKS: list[tuple[str, Callable[[Mode, Path], str]]] = [
    ("gpt2_bf16_step", check_gpt2_bf16_step),
    ("cuda_rng_resume", check_cuda_rng_resume),
    ("gpu_state_roundtrip", check_gpu_state_roundtrip),
    ("llama_4bit_load", check_llama_4bit_load),
    ("cuda_async_save", check_cuda_async_save),
]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_checks(mode: Mode, only: set[str] | None = None) -> str:
    started = time.monotonic()
    rows = []
    for name, check in CHECKS:
        if only is not None and name not in only:
            continue
        if time.monotonic() - started > BUDGET_S:
            rows.append((name, "skipped", f"time budget of {BUDGET_S:.0f} s spent"))
            continue
        t = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                detail = check(mode, Path(tmp))
                result = "skipped" if detail.startswith("skipped") else "ok"
            except ModuleNotFoundError as exc:  # this machine's Python lacks a package
                result, detail = "skipped", f"needs the {exc.name} package, not installed here"
            except Exception as exc:  # a failing check is a row, not the end of the table
                traceback.print_exc()
                result, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        rows.append((name, result, f"{detail} ({time.monotonic() - t:.0f} s)"))
        print(f"{name}: {result}: {detail}", flush=True)
    device = torch.cuda.get_device_name(mode.device) if mode.cuda else platform.processor() or "CPU"
    lines = [
        "# GPU checks"
        + (" (CPU dry run at tiny size: not a GPU measurement)" if not mode.cuda else ""),
        "",
        f"- device: {device}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}",
        f"- commit {_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- `python bench/gpu_checks.py{' --dry-run' if mode.tiny else ''}`, "
        f"{time.monotonic() - started:.0f} s",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *[f"| {n} | {r} | {d.replace('|', '/')} |" for n, r, d in rows],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU checks for ckptkit and Time-LLM.")
    parser.add_argument("--dry-run", action="store_true", help="every check at tiny size")
    parser.add_argument("--out", type=Path, help=f"where to write the table [GPU: {RESULTS}]")
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    ns = parser.parse_args(argv)
    only = set(ns.only.split(",")) if ns.only else None
    if only is not None and (unknown := only - {name for name, _ in CHECKS}):
        parser.error(f"unknown check(s) {', '.join(sorted(unknown))}")
    cuda = torch.cuda.is_available()
    if not cuda and not ns.dry_run:
        print("no CUDA device here: nothing to check on a GPU (--dry-run rehearses every "
              "check at tiny size on CPU)")  # fmt: skip
        return 0
    mode = Mode(torch.device("cuda:0" if cuda else "cpu"), tiny=ns.dry_run)
    table = run_checks(mode, only)
    out = ns.out or (RESULTS if cuda and not ns.dry_run else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        print(f"wrote {out}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
