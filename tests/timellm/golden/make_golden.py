"""Regenerate the upstream golden files from an upstream Time-LLM checkout.

    git --git-dir=MIRROR archive 0045cde | tar -x -C /tmp/timellm-up
    python tests/timellm/golden/make_golden.py /tmp/timellm-up

Writes, next to this script:

- ``upstream_lr.json``: the learning rate of every optimizer step, for every ``--lradj``,
  for a few (learning_rate, pct_start, train_steps, train_epochs) cases;
- ``upstream_early_stopping.json``: upstream's ``EarlyStopping`` decisions for sequences of
  validation losses (ties included);
- ``upstream_scripts.json``: the ``run_main.py`` argument list of every invocation in
  upstream's ETT scripts (shell variables expanded), and every option ``run_main.py``
  declares (name, type, default, action), as facts for the option-mapping tests.

Nothing of upstream's code is copied: this script imports upstream's own
``utils/tools.py`` from the checkout given and records the numbers it produces. The loop
below re-enacts only the learning-rate path of ``run_main.py`` (line numbers of
KimMeen/Time-LLM @ 0045cde are named where each piece is emulated): the model, data and
loss are irrelevant to the learning rate and left out, and every epoch is taken to
improve the validation loss (early stopping never ends these runs).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import lr_scheduler

HERE = Path(__file__).resolve().parent
LRADJ = ("type1", "type2", "type3", "PEMS", "constant", "COS", "TST")
# (learning_rate, pct_start, train_steps, train_epochs): the first is the tiny trainer
# run of tests/timellm/test_upstream.py (2 steps per epoch, 5 epochs); the others cover
# type2's whole table, COS past T_max=20 and a non-default pct_start.
LR_CASES = (
    (0.01, 0.2, 2, 5),
    (0.01, 0.2, 3, 24),
    (0.001, 0.3, 5, 6),
)
ES_CASES: tuple[tuple[int, float, list[float]], ...] = (
    (3, 0.0, [1.0, 0.9, 0.9, 0.95, 0.9, 0.8, 0.8, 0.85, 0.86, 0.87, 0.88]),
    (2, 0.0, [0.5, 0.5, 0.5, 0.6, 0.6, 0.6]),
    (1, 0.0, [0.3, 0.4, 0.3]),
    (2, 0.1, [1.0, 0.95, 0.9, 0.85, 0.8, 0.8, 0.7, 0.75]),
    (10, 0.0, [2.0, 1.5, 1.5, 1.5, 1.7, 1.4, 1.4, 1.6, 1.8, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6]),
)


def load_tools(checkout: Path) -> types.ModuleType:
    """Upstream's ``utils/tools.py``, imported from the checkout."""
    # numpy 2 removed np.Inf, which upstream's EarlyStopping.__init__ reads (for a printout
    # only); restore the alias rather than edit upstream's file.
    if not hasattr(np, "Inf"):
        np.Inf = np.inf  # type: ignore[attr-defined]
    spec = importlib.util.spec_from_file_location("upstream_tools", checkout / "utils" / "tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upstream_lrs(
    tools: types.ModuleType,
    lradj: str,
    learning_rate: float,
    pct_start: float,
    steps: int,
    epochs: int,
) -> list[float]:
    """The lr each optimizer step of run_main.py uses (one process, no accelerate)."""
    args = tools.dotdict(lradj=lradj, learning_rate=learning_rate, pct_start=pct_start)
    param = torch.nn.Parameter(torch.zeros(1))
    # run_main.py:153
    model_optim = torch.optim.Adam([param], lr=args.learning_rate)
    # run_main.py:155-162
    if args.lradj == "COS":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(model_optim, T_max=20, eta_min=1e-8)
    else:
        scheduler = lr_scheduler.OneCycleLR(
            optimizer=model_optim,
            steps_per_epoch=steps,
            pct_start=args.pct_start,
            epochs=epochs,
            max_lr=args.learning_rate,
        )
    used: list[float] = []
    for epoch in range(epochs):  # run_main.py:173
        for _ in range(steps):  # run_main.py:179
            param.grad = torch.zeros_like(param)
            used.append(model_optim.param_groups[0]["lr"])
            model_optim.step()  # run_main.py:234
            if args.lradj == "TST":  # run_main.py:236-238
                tools.adjust_learning_rate(
                    None, model_optim, scheduler, epoch + 1, args, printout=False
                )
                scheduler.step()
        # run_main.py:248-251: early stopping is taken never to stop these runs.
        if args.lradj != "TST":  # run_main.py:253-261
            if args.lradj == "COS":
                scheduler.step()
            else:
                if epoch == 0:
                    args.learning_rate = model_optim.param_groups[0]["lr"]
                tools.adjust_learning_rate(
                    None, model_optim, scheduler, epoch + 1, args, printout=False
                )
    return used


def upstream_early_stopping(
    tools: types.ModuleType, patience: int, delta: float, losses: list[float]
) -> list[dict[str, Any]]:
    """Upstream's EarlyStopping (run_main.py:146 and :248) on ``losses``: after each call,
    whether it saved a checkpoint (a new best), its counter and early_stop flag."""
    stopper = tools.EarlyStopping(accelerator=None, patience=patience, delta=delta)
    saved: list[float] = []
    stopper.save_checkpoint = lambda val_loss, model, path: saved.append(val_loss)
    out = []
    for loss in losses:
        before = len(saved)
        with contextlib.redirect_stdout(None):  # its "EarlyStopping counter" lines
            stopper(loss, None, "")
        out.append(
            {
                "val_loss": loss,
                "new_best": len(saved) > before,
                "counter": stopper.counter,
                "early_stop": bool(stopper.early_stop),
            }
        )
    return out


def script_arguments(checkout: Path) -> dict[str, list[list[str]]]:
    """``{script: [argv of each run_main.py invocation]}`` for upstream's ETT scripts."""
    out: dict[str, list[list[str]]] = {}
    for script in sorted((checkout / "scripts").glob("TimeLLM_ETT*.sh")):
        text = script.read_text().replace("\\\n", " ")
        variables = dict(re.findall(r"^(\w+)=(\S+)\s*$", text, flags=re.M))
        runs = []
        for line in text.splitlines():
            if "run_main.py" not in line:
                continue
            words = shlex.split(line.split("run_main.py", 1)[1])
            runs.append([_expand(w, variables) for w in words])
        if runs:
            out[script.name] = runs
    return out


def run_main_options(checkout: Path) -> list[dict[str, Any]]:
    """Every ``parser.add_argument`` of ``run_main.py``: name, type, default, action."""
    tree = ast.parse((checkout / "run_main.py").read_text())
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        out.append(
            {
                "name": ast.literal_eval(node.args[0]).removeprefix("--"),
                "type": kw["type"].id if isinstance(kw.get("type"), ast.Name) else None,
                "default": ast.literal_eval(kw["default"]) if "default" in kw else None,
                "action": ast.literal_eval(kw["action"]) if "action" in kw else None,
            }
        )
    return out


def _expand(word: str, variables: dict[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        return shlex.split(variables[m.group(1)])[0]

    return re.sub(r"\$(\w+)", value, word)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="an upstream Time-LLM checkout")
    parser.add_argument("--commit", help="upstream commit (default: git rev-parse in checkout)")
    ns = parser.parse_args()
    commit = ns.commit or _commit(ns.checkout)
    tools = load_tools(ns.checkout)
    source = {"upstream": "KimMeen/Time-LLM", "commit": commit, "torch": torch.__version__}
    lr_cases = [
        {
            "lradj": lradj,
            "learning_rate": lr,
            "pct_start": pct,
            "train_steps": steps,
            "train_epochs": epochs,
            "lr": upstream_lrs(tools, lradj, lr, pct, steps, epochs),
        }
        for lr, pct, steps, epochs in LR_CASES
        for lradj in LRADJ
    ]
    es_cases = [
        {"patience": p, "delta": d, "calls": upstream_early_stopping(tools, p, d, losses)}
        for p, d, losses in ES_CASES
    ]
    _write("upstream_lr.json", {**source, "cases": lr_cases})
    _write("upstream_early_stopping.json", {**source, "cases": es_cases})
    scripts = {"scripts": script_arguments(ns.checkout), "options": run_main_options(ns.checkout)}
    _write("upstream_scripts.json", {**source, **scripts})


def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        sys.exit("not a git checkout: pass --commit SHA (the upstream commit it was taken from)")


def _write(name: str, data: dict[str, Any]) -> None:
    (HERE / name).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
