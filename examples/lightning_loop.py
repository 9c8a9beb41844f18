"""A tiny LightningModule on synthetic data, every checkpoint committed into a ckptkit run.

    python examples/lightning_loop.py --output runs/lit --max-steps 12 --save-steps 2

Run the same command again after a kill (or on a new machine, with a gs:// or drive://
URL): it resumes from the newest valid checkpoint of the run, never from a partial one.
Lightning's retention applies (``ModelCheckpoint(save_top_k=1, save_last=True)``), except
that the checkpoint a run resumed from is never deleted (docs/INTEGRATIONS.md). The
DataLoader saves its position, so a resume mid-epoch is exact too.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckptkit.integrations.lightning import CkptkitCheckpointIO

SAMPLES, BATCH = 16, 4  # 4 batches an epoch


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader that saves its position in the epoch. Lightning stores the
    ``state_dict()`` of such a loader in its checkpoint (``loops``) and loads it on resume,
    so that a run resumed mid-epoch goes on with the next batch; with a plain DataLoader
    it would replay that epoch differently (Lightning warns: "your dataloader is not
    resumable"). The order is fixed (no shuffle): Lightning saves no RNG state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0  # batches of the current epoch already trained on (set by a resume)
        self._served = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._served = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._served = i + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["served"])


def make_data() -> ResumableLoader:
    """The same synthetic regression set on every run, in a fixed order."""
    x = torch.randn(SAMPLES, 4, generator=torch.Generator().manual_seed(0))
    y = torch.sin(x).sum(1, keepdim=True)
    return ResumableLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def make_trainer(
    max_steps: int, plugins: list[Any], checkpoint: ModelCheckpoint, root: str
) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        deterministic=True,
        default_root_dir=root,
        callbacks=[checkpoint],
        plugins=plugins,
    )


def train(
    max_steps: int,
    plugins: list[Any],
    checkpoint: ModelCheckpoint,
    root: str,
    ckpt_path: str | None = None,
) -> Regressor:
    """Seed, build and fit; the same for a fresh run and a resumed one."""
    pl.seed_everything(0, verbose=False)
    model = Regressor()
    make_trainer(max_steps, plugins, checkpoint, root).fit(model, make_data(), ckpt_path=ckpt_path)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="ckptkit run URL (path, gs://, drive://)")
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--work-dir", default="lightning-out", help="Trainer.default_root_dir")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    io = CkptkitCheckpointIO(a.output)
    start = io.resume_path()  # None on a fresh run
    print(f"resuming from {start}" if start else "starting fresh", flush=True)
    checkpoint = ModelCheckpoint(every_n_train_steps=a.save_steps, save_top_k=1, save_last=True)
    try:
        train(a.max_steps, [io], checkpoint, a.work_dir, ckpt_path=start)
    finally:
        io.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
