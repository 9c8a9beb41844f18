"""Learning-rate schedules: upstream's ``--lradj`` values, ours and upstream-exact.

The trainer calls :meth:`Schedule.after_step` after every optimizer step and
:meth:`Schedule.after_epoch` at every epoch end; both schedules checkpoint through
``state_dict()`` (the optimizer's own state holds the current lr).

- Ours (the default): the ``lradj`` shapes with ``learning_rate`` as the peak, as a
  ``LambdaLR`` stepped per epoch (``TST``: ``OneCycleLR`` over the run's steps).
- ``compat="upstream"``: what upstream's ``run_main.py`` does, step for step. Every
  ``lradj`` but ``COS`` constructs ``OneCycleLR(max_lr=learning_rate)``, whose constructor
  sets the lr to ``max_lr / 25``; after the first epoch ``run_main.py`` copies that lr into
  ``args.learning_rate``, the base of ``adjust_learning_rate``. So type1, type2, type3,
  PEMS and constant train at ``learning_rate / 25`` and below. ``TST`` steps the
  ``OneCycleLR`` every batch over ``train_epochs * steps_per_epoch`` steps; ``COS`` steps a
  ``CosineAnnealingLR(T_max=20, eta_min=1e-8)`` every epoch from the full ``learning_rate``.
  ``tests/timellm/golden/`` holds the numbers upstream's own code produced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, OneCycleLR

from ckptkit.errors import IncompatibleCheckpointError
from timellm.model import TimeLLMConfig

# Upstream's type2 table: from epoch (1-based, as adjust_learning_rate counts) -> lr.
TYPE2_TABLE = {2: 5e-5, 4: 1e-5, 6: 5e-6, 8: 1e-6, 10: 5e-7, 15: 1e-7, 20: 5e-8}
COS_T_MAX, COS_ETA_MIN = 20, 1e-8


def epoch_lr(lradj: str, epoch: int, base: float) -> float | None:
    """The lr upstream's ``adjust_learning_rate`` sets after ``epoch - 1`` finished epochs
    (``epoch`` counts from 1), or None when it leaves the lr alone."""
    if lradj == "type1":
        return base * (0.5 ** ((epoch - 1) // 1))
    if lradj == "type2":
        return TYPE2_TABLE.get(epoch)
    if lradj == "type3":
        return base if epoch < 3 else base * (0.9 ** ((epoch - 3) // 1))
    if lradj == "PEMS":
        return base * (0.95 ** (epoch // 1))
    if lradj == "constant":
        return base
    return None


class Schedule:
    """What the trainer steps; subclasses decide when the lr changes."""

    def after_step(self) -> None:
        """After each optimizer step."""

    def after_epoch(self) -> None:
        """At each epoch end, after validation."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def _quiet_step(sched: LRScheduler) -> None:
    with warnings.catch_warnings():
        # torch's "scheduler before optimizer" check misfires when a resumed process starts
        # at an epoch end: its optimizer stepped before the save.
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        sched.step()


class OurSchedule(Schedule):
    """The default: ``learning_rate`` is the peak lr (no ``/25``); see the module doc."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: TimeLLMConfig, total_steps: int) -> None:
        self.per_step = cfg.lradj == "TST"
        self.sched: LRScheduler
        if self.per_step:
            self.sched = OneCycleLR(
                opt, max_lr=cfg.learning_rate, total_steps=max(total_steps, 2),
                pct_start=cfg.pct_start,
            )  # fmt: skip
        elif cfg.lradj == "COS":
            self.sched = CosineAnnealingLR(opt, T_max=COS_T_MAX, eta_min=COS_ETA_MIN)
        else:
            lr = cfg.learning_rate
            # LambdaLR counts finished epochs e; upstream adjusts with e + 1 after epoch e.
            factors: dict[str, Callable[[int], float]] = {
                "type1": lambda e: 0.5 ** max(0, e - 1),
                "type2": lambda e: _type2_latest(e, lr) / lr,
                "type3": lambda e: 1.0 if e < 3 else 0.9 ** (e - 3),
                "PEMS": lambda e: 0.95**e,
                "constant": lambda e: 1.0,
            }
            factor = factors[cfg.lradj]
            self.sched = LambdaLR(opt, factor)

    def after_step(self) -> None:
        if self.per_step:
            self.sched.step()

    def after_epoch(self) -> None:
        if not self.per_step:
            _quiet_step(self.sched)

    def state_dict(self) -> dict[str, Any]:
        return self.sched.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.per_step and state.get("total_steps", 0) < self.sched.total_steps:
            # A one-cycle cannot be stretched: stepping past its end raises mid-run.
            raise IncompatibleCheckpointError(
                f"the checkpoint's TST (one-cycle) schedule spans {state['total_steps']} "
                f"steps, this run would take {self.sched.total_steps}: resume with "
                "max_steps (--max-steps) no larger, or train into a new output"
            )
        self.sched.load_state_dict(state)


def _type2_latest(epoch: int, lr: float) -> float:
    """type2's lr during epoch ``epoch`` (0-based): the latest table entry at or before it."""
    keys = [k for k in TYPE2_TABLE if k <= epoch]
    return TYPE2_TABLE[max(keys)] if keys else lr


class UpstreamSchedule(Schedule):
    """``run_main.py``'s learning-rate handling (KimMeen/Time-LLM @ 0045cde, lines 153-162
    to build it, 236-238 per batch, 253-264 per epoch), in one process."""

    def __init__(
        self, opt: torch.optim.Optimizer, cfg: TimeLLMConfig, steps_per_epoch: int
    ) -> None:
        self.opt, self.lradj = opt, cfg.lradj
        self.base = cfg.learning_rate  # upstream's args.learning_rate, replaced after epoch 0
        self.epoch = 0
        self.sched: LRScheduler
        if cfg.lradj == "COS":
            self.sched = CosineAnnealingLR(opt, T_max=COS_T_MAX, eta_min=COS_ETA_MIN)
        else:
            self.sched = OneCycleLR(
                optimizer=opt, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start,
                epochs=cfg.train_epochs, max_lr=cfg.learning_rate,
            )  # fmt: skip

    def _set(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def after_step(self) -> None:
        if self.lradj == "TST":
            self._set(self.sched.get_last_lr()[0])
            self.sched.step()

    def after_epoch(self) -> None:
        if self.lradj == "COS":
            _quiet_step(self.sched)
        elif self.lradj != "TST":
            if self.epoch == 0:
                self.base = self.opt.param_groups[0]["lr"]
            lr = epoch_lr(self.lradj, self.epoch + 1, self.base)
            if lr is not None:
                self._set(lr)
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.sched.state_dict(), "base": self.base, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, ours = (
            state["scheduler"].get("total_steps"),
            getattr(self.sched, "total_steps", None),
        )
        if saved != ours:
            # The one-cycle cannot be stretched: stepping past its end raises mid-run.
            raise IncompatibleCheckpointError(
                f"the checkpoint's upstream schedule spans {saved} steps, this run's {ours} "
                "(train_epochs x steps per epoch): resume with the checkpoint's train_epochs "
                "and batch_size, or train into a new output"
            )
        self.sched.load_state_dict(state["scheduler"])
        self.base, self.epoch = float(state["base"]), int(state["epoch"])


def build_schedule(
    opt: torch.optim.Optimizer, cfg: TimeLLMConfig, steps_per_epoch: int, total_steps: int
) -> Schedule:
    """The schedule a config asks for. ``total_steps`` (the run's steps, ``max_steps``
    included) sizes only our ``TST``; upstream's is sized by ``train_epochs`` alone."""
    if cfg.compat == "upstream":
        return UpstreamSchedule(opt, cfg, steps_per_epoch)
    return OurSchedule(opt, cfg, total_steps)
