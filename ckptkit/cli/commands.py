"""The built-in commands: inspect, ls, verify, convert."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError

TRUST_HELP = (
    "Allow arbitrary pickled objects in legacy files. This EXECUTES code from the file: "
    "only for files whose author you trust."
)

BREAK_LOCK_HELP = (
    "Take over the run lock of a writer that is gone (a crashed VM's lock goes stale "
    "only after 2 minutes); never while that writer still runs."
)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option(
    "--no-verify", is_flag=True, help="Skip checking sizes and hashes against the manifest."
)
@click.option("--trust", is_flag=True, help=TRUST_HELP)
def inspect_cmd(path: str, as_json: bool, no_verify: bool, trust: bool) -> None:
    """Show what a checkpoint holds: format, step, epoch, metrics, state entries
    (tensor counts, shapes), versions, config, and what a legacy file lacks.

    PATH is a checkpoint directory, a run (its latest valid checkpoint), or a legacy
    file (torch.save'd state_dict or dict checkpoint, HF Trainer checkpoint-N).
    """
    from ckptkit import reader

    try:
        info = reader.inspect(path, verify=not no_verify, trust=trust)
    except CorruptCheckpointError as exc:
        if not as_json:
            raise
        _echo_json(reader.inspect_damaged(path, str(exc)))
        raise click.exceptions.Exit(CorruptCheckpointError.exit_code) from None
    except UnsafeCheckpointError as exc:
        _show_refused(path, exc, as_json)
        raise
    if as_json:
        _echo_json(info)
        return
    click.echo(f"{info['source']}  ({info['format']}, complete)")
    click.echo(
        f"  step {info['step']}  epoch {info['epoch']}  {_fmt_metrics(info['metrics'])}".rstrip()
    )
    for key, desc in info["state"].items():
        if isinstance(desc, dict) and set(desc) == {"tensors", "parameters", "bytes"}:
            click.echo(
                f"  {key}: {desc['tensors']} tensors, {desc['parameters']:,} values, {_human_size(desc['bytes'])}"
            )
        elif isinstance(desc, dict):
            click.echo(f"  {key}: {', '.join(list(desc)[:8])}{' ...' if len(desc) > 8 else ''}")
        else:
            click.echo(f"  {key}: {desc!r}")
    if info.get("versions"):
        click.echo(
            "  saved with " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items()))
        )
    click.echo(
        f"  {info['tensors']} tensors, {_human_size(info['bytes'])}, dtypes {', '.join(info['dtypes']) or '-'}"
    )
    for note in info["notes"]:
        click.echo(f"  note: {note}")
    if info["config_globals"]:
        click.echo(f"  read as plain data (allowlisted): {', '.join(info['config_globals'])}")
    if info["unsafe_globals"]:
        click.echo(f"  unpickled with --trust: {', '.join(info['unsafe_globals'])}")
    for gap in info["lacks"]:
        click.echo(f"  a resume would lack: {gap}")


def _show_refused(path: str, exc: UnsafeCheckpointError, as_json: bool) -> None:
    """What ``inspect`` says of a file it refuses: every global outside the allowlist."""
    from ckptkit.cli import as_flags

    names = list(getattr(exc, "globals", []))
    if as_json:
        _echo_json(
            {
                "source": path,
                "path": path,
                "format": None,
                "complete": False,
                "problem": as_flags(str(exc)),
                "unsafe_globals": names,
            }
        )
        return
    click.echo(f"{path}  (refused: not loaded, nothing in it was run)")
    for name in names:
        click.echo(f"  references non-allowlisted global: {name}")


@click.command("ls")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option(
    "--no-verify",
    is_flag=True,
    help="Check only manifests and file sizes, not the hashes of the latest checkpoint "
    "(faster on remote storage; the latest shown may then be one a resume skips).",
)
def ls_cmd(run: str, as_json: bool, no_verify: bool) -> None:
    """List every checkpoint of RUN, oldest first: step, epoch, size, time, metrics,
    and status. `latest` marks the checkpoint a resume restores (its hashes checked,
    and the sizes of the others); `best` the best complete one. Incomplete (an
    interrupted save) and corrupt ones are listed as such and never used to resume."""
    from ckptkit.manager import CheckpointManager

    with CheckpointManager(run, readonly=True) as mgr:
        rows = mgr.status(verify=not no_verify)
    if not rows:  # not a native run: perhaps one checkpoint written by another tool
        from ckptkit import reader

        rows = reader.foreign_status(run, verify=not no_verify)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        raise CheckpointNotFoundError(f"{run}: no checkpoints")
    click.echo(f"{'name':<22} {'step':>8} {'epoch':>5} {'size':>9}  {'saved':<19}  metrics")
    for row in rows:
        mark = " latest" if row["latest"] else ""
        mark += " best" if row["best"] else ""
        mark += f" ({row['format']})" if row.get("format") else ""
        if row["status"] != "complete":
            mark += f" {row['status'].upper()}"
        saved = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
            if row["created"]
            else "-"
        )
        epoch = "" if row["epoch"] is None else row["epoch"]
        size = "-" if row["size"] is None else _human_size(row["size"])
        click.echo(
            f"{row['name']:<22} {'-' if row['step'] is None else row['step']:>8} {epoch!s:>5} {size:>9}  "
            f"{saved:<19}  {_fmt_metrics(row['metrics'])}{mark}"
        )
    # On stderr, so that the table stays one line per checkpoint for scripts.
    click.echo(_checked_note(rows, run), err=True)


def _checked_note(rows: list[dict[str, Any]], run: str) -> str:
    if any(r["checked"] == "decoded" for r in rows):
        return f"checked: read and decoded in full (`ckptkit inspect {run}` shows what it holds)"
    hashed = [r["name"] for r in rows if r["checked"] == "hash"]
    what = f"hashes of {', '.join(hashed)}; sizes of the others" if hashed else "sizes only"
    return f"checked: manifests, file {what} (`ckptkit verify {run}` reads every byte)"


@click.command("verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust", is_flag=True, help=TRUST_HELP)
def verify_cmd(path: str, as_json: bool, trust: bool) -> None:
    """Check every file of a checkpoint (or of every checkpoint in a run) against
    its manifest: presence, size and hash; legacy files are test-loaded safely.

    Exits 4 when anything is corrupt or incomplete (naming the bad files), 0 when all
    is well (docs/EXIT_CODES.md)."""
    from ckptkit import reader

    results = reader.verify(path, trust=trust)
    bad = [r for r in results if not r["ok"]]
    if as_json:
        _echo_json({"ok": not bad, "checkpoints": results})
    else:
        for r in results:
            click.echo(
                f"{'OK     ' if r['ok'] else 'CORRUPT'} {r['url']}"
                + (f"\n        {r['problem']}" if r["problem"] else "")
            )
    if bad:
        raise click.exceptions.Exit(CorruptCheckpointError.exit_code)


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--step", type=int, default=None, help="Step to record (default: the source's, else 0)."
)
@click.option("--trust", is_flag=True, help=TRUST_HELP)
@click.option("--break-lock", is_flag=True, help=BREAK_LOCK_HELP)
def convert_cmd(src: str, dst: str, step: int | None, trust: bool, break_lock: bool) -> None:
    """Convert SRC (any checkpoint we read: legacy state_dict, dict checkpoint, HF
    checkpoint-N, native) into a native checkpoint in run DST.

    The result restores with CheckpointManager(DST).restore(state) and loads
    with weights_only safety; what the source lacked is printed."""
    from ckptkit import reader
    from ckptkit.manager import CheckpointManager

    loaded = reader.read_checkpoint(src, trust=trust)
    with CheckpointManager(dst, keep_last=None, keep_best=0, break_lock=break_lock) as mgr:
        info = mgr.save(
            step if step is not None else (loaded.step or 0),
            loaded.state,
            loaded.metrics,
            epoch=loaded.epoch,
        )
    assert info is not None
    click.echo(f"converted {loaded.source} ({loaded.kind}) -> {info.url}")
    for note in loaded.notes:
        click.echo(f"  note: {note}")


COMMANDS = [inspect_cmd, ls_cmd, verify_cmd, convert_cmd]
