"""The built-in commands: inspect, ls, verify, convert."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ckptkit.manifest import MANIFEST, parse_name
from ckptkit.storage.registry import open_storage

if TYPE_CHECKING:
    from ckptkit.run import CheckpointInfo

TRUST_HELP = (
    "Allow arbitrary pickled objects in legacy files. This EXECUTES code from the file: "
    "only for files whose author you trust."
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
    "--no-verify", is_flag=True, help="Skip checking sizes and sha256 against the manifest."
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
        if isinstance(desc, dict) and "tensors" in desc:
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


def _best_name(checkpoints: list[CheckpointInfo]) -> str | None:
    """The best checkpoint by the metric the run's manager was configured with."""
    from ckptkit.policies import KeepBestK

    if not checkpoints:
        return None
    meta = checkpoints[-1].manifest.metadata
    metric, mode = meta.get("best_metric"), meta.get("mode", "min")
    if metric is None:  # the newest checkpoint an EarlyStopping marked as a new best
        return next((c.name for c in reversed(checkpoints) if c.is_best), None)
    ranked = KeepBestK(1, metric, mode if mode in ("min", "max") else "min").ranked(checkpoints)
    return ranked[0].name if ranked else None


def ls_rows(run: str) -> list[dict[str, Any]]:
    """Every checkpoint directory of ``run`` with its ``status`` (complete, incomplete or
    corrupt) and ``latest``/``best`` markers, oldest first."""
    from ckptkit import run as runmod

    storage = open_storage(run)
    committed = {c.name: c for c in runmod.list_checkpoints(storage, quiet=True)}
    rows: list[dict[str, Any]] = []
    complete: list[CheckpointInfo] = []
    for name in sorted(storage.listdir(""), key=lambda n: parse_name(n) or (-1, 0)):
        parsed = parse_name(name)
        if parsed is None:
            continue
        info = committed.get(name)
        row: dict[str, Any] = {
            "name": name,
            "path": storage.url_of(name),
            "step": parsed[0],
            "epoch": None,
            "metrics": {},
            "created": None,
            "size": None,
            "files": None,
            "status": "complete",
            "problem": None,
        }
        try:
            if info is None:
                # Re-read to name the problem: no manifest at all, or one that won't parse.
                runmod.read_manifest(storage, name)
            else:
                row.update(info.summary())
                runmod.check_sizes(storage, info)
                complete.append(info)
        except CorruptCheckpointError as exc:
            missing = not storage.exists(f"{name}/{MANIFEST}")
            row.update(status="incomplete" if missing else "corrupt", problem=str(exc))
        row["path"] = storage.url_of(name)
        rows.append(row)
    best = _best_name(complete)
    latest = complete[-1].name if complete else None
    for row in rows:
        row["latest"], row["best"] = row["name"] == latest, row["name"] == best
        row["is_best"] = row["best"]
    return rows


@click.command("ls")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def ls_cmd(run: str, as_json: bool) -> None:
    """List every checkpoint of RUN, oldest first: step, epoch, size, time, metrics,
    and status. The latest and best complete checkpoints are marked; incomplete (an
    interrupted save) and corrupt ones are listed as such and never used to resume."""
    rows = ls_rows(run)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        raise CheckpointNotFoundError(f"{run}: no checkpoints")
    click.echo(f"{'name':<22} {'step':>8} {'epoch':>5} {'size':>9}  {'saved':<19}  metrics")
    for row in rows:
        mark = " latest" if row["latest"] else ""
        mark += " best" if row["best"] else ""
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
            f"{row['name']:<22} {row['step']:>8} {epoch!s:>5} {size:>9}  "
            f"{saved:<19}  {_fmt_metrics(row['metrics'])}{mark}"
        )


@click.command("verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust", is_flag=True, help=TRUST_HELP)
def verify_cmd(path: str, as_json: bool, trust: bool) -> None:
    """Check every file of a checkpoint (or of every checkpoint in a run) against
    its manifest: presence, size and sha256; legacy files are test-loaded safely.

    Exits 1 when anything is corrupt or incomplete (naming the bad files), 0 when all is well."""
    from ckptkit import reader
    from ckptkit import run as runmod

    storage = open_storage(path)
    results: list[dict[str, Any]] = []
    if storage.exists(MANIFEST):
        targets = [("", path)]
    else:
        names = [n for n in storage.listdir("") if parse_name(n)]
        targets = [(n, storage.url_of(n)) for n in names]
    if not targets:
        reader.read_checkpoint(path, trust=trust)  # legacy: a safe full load is the check
        results.append({"url": path, "ok": True, "problem": None})
    for name, url in targets:
        try:
            if name:  # a checkpoint of the run: its manifest must be there (no legacy guess)
                info = runmod.CheckpointInfo(name, url, runmod.read_manifest(storage, name))
                runmod.read_state(storage, info, verify=True)
            else:
                reader.read_checkpoint(path, verify=True)
            results.append({"url": url, "ok": True, "problem": None})
        except CorruptCheckpointError as exc:
            results.append({"url": url, "ok": False, "problem": str(exc)})
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
        raise click.exceptions.Exit(1)


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--step", type=int, default=None, help="Step to record (default: the source's, else 0)."
)
@click.option("--trust", is_flag=True, help=TRUST_HELP)
def convert_cmd(src: str, dst: str, step: int | None, trust: bool) -> None:
    """Convert SRC (any checkpoint we read: legacy state_dict, dict checkpoint, HF
    checkpoint-N, native) into a native checkpoint in run DST.

    The result restores with CheckpointManager(DST).restore(state) and loads
    with weights_only safety; what the source lacked is printed."""
    from ckptkit import reader
    from ckptkit.manager import CheckpointManager

    loaded = reader.read_checkpoint(src, trust=trust)
    with CheckpointManager(dst, keep_last=None, keep_best=0) as mgr:
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
