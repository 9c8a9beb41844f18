"""A tiny MLP trained with Hugging Face accelerate, its whole state in a ckptkit run.

    python examples/accelerate_loop.py --output runs/acc --max-steps 40 --save-steps 5

Run the same command again after a kill (or on a new machine, with a gs:// or drive://
URL): it resumes from the newest valid checkpoint of the run, mid-epoch at the next batch,
and ends with the weights an uninterrupted run ends with, bit for bit.
"""

from __future__ import annotations

import argparse
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ckptkit.integrations.accelerate import CkptkitAccelerate


class Counter:
    """A custom object checkpointed through ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.samples = 0

    def state_dict(self) -> dict[str, int]:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples = int(state["samples"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="ckptkit run URL (path, gs://, drive://)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--save-steps", type=int, default=5)
    p.add_argument("--keep-last", type=int, default=3)
    a = p.parse_args(argv)

    accelerator = Accelerator(cpu=True)
    set_seed(0)
    # Synthetic regression data, the same on every run; 40 samples / batch 8 = 5 batches
    # an epoch, so saves land mid-epoch as well as at epoch ends.
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    y = x @ torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )
    # Dropout draws from torch's RNG at every step: a resume must restore it exactly.
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    model, opt, data, sched = accelerator.prepare(model, opt, data, sched)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)

    with CkptkitAccelerate(
        accelerator, a.output, keep_last=a.keep_last, save_every_steps=a.save_steps
    ) as ck:
        result = ck.resume()  # the newest valid checkpoint, or a fresh start
        step = result.step or 0
        print(f"resumed at step {step}" if result.resumed else "starting fresh", flush=True)
        loader = ck.loader(data)
        while step < a.max_steps:
            for xb, yb in loader:
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                counter.samples += len(xb)
                step += 1
                ck.maybe_save(step, metrics={"loss": loss.item()})
                if step >= a.max_steps:
                    break
        if not ck.manager.list() or ck.manager.list()[-1].step != step:
            ck.save(step)  # the final weights, whatever the save interval
    return 0


if __name__ == "__main__":
    sys.exit(main())
