"""Forecast with a trained checkpoint (upstream Time-LLM has no inference script).

The checkpoint carries everything needed: the model/data config, the trainable
weights and the training data's scaler; the frozen LLM is rebuilt from the config
(offline) and checked against the recorded backbone fingerprint.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd
import torch

import ckptkit
from timellm.data.loading import resolve
from timellm.model import TimeLLMConfig, build_model


def _pick_checkpoint(url: str, which: str) -> ckptkit.CheckpointInfo | None:
    """For a run URL, the checkpoint ``which`` (best/latest/step) names; None for a
    checkpoint URL (read directly)."""
    mgr = ckptkit.CheckpointManager(url, readonly=True)
    try:
        checkpoints = mgr.list()
        if not checkpoints:
            return None
        if which == "best":
            return mgr.best() or mgr.latest()
        if which == "latest":
            return mgr.latest()
        matches = [c for c in checkpoints if str(c.step) == which or c.name == which]
        if not matches:
            raise ckptkit.CheckpointNotFoundError(
                f"{url}: no checkpoint {which!r}; steps: {', '.join(str(c.step) for c in checkpoints)}"
            )
        return matches[-1]
    finally:
        mgr.close()


def load_for_inference(checkpoint: str, which: str = "best") -> tuple[Any, dict[str, Any], str]:
    """``(model, state, source)`` from a run (its best/latest/step checkpoint) or a checkpoint."""
    info = _pick_checkpoint(checkpoint, which)
    loaded = ckptkit.read_checkpoint(info.url if info is not None else checkpoint)
    saved = (loaded.meta.get("metadata") or {}).get("time_llm_config")
    if not saved or "model" not in loaded.state or "data_scaler" not in loaded.state:
        raise ckptkit.IncompatibleCheckpointError(
            f"{loaded.source} is not a Time-LLM checkpoint written by `ckptkit train` "
            "(no config, model or data scaler in it)"
        )
    known = {f.name for f in fields(TimeLLMConfig)}
    cfg = TimeLLMConfig.from_dict({k: v for k, v in saved.items() if k in known})
    model = build_model(cfg)
    fingerprint = str(model.backbone_fingerprint()["digest"])
    if loaded.state.get("backbone") not in (None, fingerprint):
        raise ckptkit.IncompatibleCheckpointError(
            f"{loaded.source} was trained on another backbone ({loaded.state['backbone']}) than the "
            f"one available here ({cfg.llm}, {fingerprint})"
        )
    # The backbone was checked above; this model is not placed or quantized as in training,
    # so its frozen bytes may differ from the fingerprint the trainer recorded.
    ckptkit.TrainableOnly(model, check_frozen=False).load_state_dict(loaded.state["model"])
    model.eval()
    return model, loaded.state, loaded.source


def _future_dates(dates: pd.Series, n: int) -> pd.DatetimeIndex:
    dates = pd.to_datetime(dates)
    with warnings.catch_warnings():
        # pandas 3 announces that this returns an offset instead of a string: both do below.
        warnings.simplefilter("ignore", DeprecationWarning)
        freq = pd.infer_freq(dates.iloc[-min(len(dates), 50) :])
    if freq is None:
        freq = pd.tseries.frequencies.to_offset(dates.iloc[-1] - dates.iloc[-2])
    return pd.date_range(dates.iloc[-1], periods=n + 1, freq=freq)[1:]


@torch.no_grad()
def predict(
    checkpoint: str, data: str, out: str, *, plot: str | None = None, which: str = "best"
) -> pd.DataFrame:
    """Forecast the ``pred_len`` steps after the end of ``data`` (a bundled dataset name
    or a CSV with a ``date`` column and the training columns); write them to ``out``."""
    model, state, source = load_for_inference(checkpoint, which)
    cfg: TimeLLMConfig = model.cfg
    scaler = state["data_scaler"]
    columns = list(scaler["columns"])
    path, _ = resolve(data)
    frame = pd.read_csv(path)
    missing = [c for c in ["date", *columns] if c not in frame.columns]
    if missing:
        raise ckptkit.ConfigError(
            f"{data}: missing column(s) {', '.join(missing)}; the model was trained on {', '.join(columns)}"
        )
    if len(frame) < cfg.seq_len:
        raise ckptkit.ConfigError(
            f"{data}: needs at least seq_len={cfg.seq_len} rows, has {len(frame)}"
        )
    mean, scale = np.asarray(scaler["mean"]), np.asarray(scaler["scale"])
    history = frame[columns].to_numpy(dtype=np.float64)[-cfg.seq_len :]
    x = torch.as_tensor((history - mean) / scale, dtype=torch.float32).unsqueeze(0)
    device = next(p.device for p in model.trainable_parameters())
    pred = model(x.to(device)).float().cpu().numpy()[0] * scale + mean  # [pred_len, N]
    result = pd.DataFrame(pred, columns=columns)
    result.insert(0, "date", _future_dates(frame["date"], cfg.pred_len))
    result.to_csv(out, index=False)
    if plot:
        _plot(frame, columns, result, cfg, plot, source)
    return result


def _plot(
    frame: pd.DataFrame,
    columns: list[str],
    result: pd.DataFrame,
    cfg: TimeLLMConfig,
    path: str,
    source: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(columns)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.8 * n + 0.6), sharex=True, squeeze=False)
    past = frame.iloc[-cfg.seq_len :]
    past_dates = pd.to_datetime(past["date"])
    for ax, col in zip(axes[:, 0], columns, strict=True):
        ax.plot(past_dates, past[col], color="tab:blue", lw=1)
        ax.plot(result["date"], result[col], color="tab:orange", lw=1.5)
        ax.set_ylabel(col, rotation=0, ha="right")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"Time-LLM forecast, {cfg.pred_len} steps ({source})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
