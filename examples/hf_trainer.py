"""A tiny GPT-2 trained by the Hugging Face Trainer, checkpointed into a ckptkit run.

    python examples/hf_trainer.py --output runs/hf --max-steps 20 --save-steps 4

Run the same command again after a kill (or on a new machine, with a gs:// or drive://
URL): it resumes from the newest valid checkpoint of the run, never from a partial one.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ckptkit.integrations.hf import CkptkitCallback


class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences, the same on every run."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="ckptkit run URL (path, gs://, drive://)")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--work-dir", default="hf-trainer-out", help="the Trainer's local output_dir")
    p.add_argument("--keep-last", type=int, default=3)
    a = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    args = TrainingArguments(
        output_dir=a.work_dir,
        use_cpu=True,
        report_to=[],
        max_steps=a.max_steps,
        save_steps=a.save_steps,
        save_total_limit=2,  # local disk only: the run keeps its own (docs/INTEGRATIONS.md)
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    cb = CkptkitCallback(a.output, keep_last=a.keep_last)
    trainer = Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens(), callbacks=[cb])
    try:
        start = cb.resume_dir(a.work_dir)  # None on a fresh run
        print(f"resuming from {start}" if start else "starting fresh", flush=True)
        trainer.train(resume_from_checkpoint=start)
    finally:
        cb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
