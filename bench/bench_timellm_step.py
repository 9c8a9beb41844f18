"""Time one Time-LLM training step, stage by stage: our path vs upstream's.

"ours" is ``TimeLLM`` as shipped: batch statistics with five host transfers, the fixed prompt
pieces tokenized once, SDPA attention. "upstream" runs the same model and weights the way
upstream ``models/TimeLLM.py`` does: a per-sample Python loop building each prompt string with
per-element ``.tolist()``, the whole prompts tokenized every step, and the LLM configured with
``output_attentions``/``output_hidden_states`` (which forces eager attention and materializes
every attention map). Upstream used the slow Python GPT-2 tokenizer; both paths here use the
same fast tokenizer, so the prompt gap shown is a lower bound.

Steps alternate between the two paths on the same batches, so machine noise hits both alike.
Run ``python -m bench.bench_timellm_step`` (add ``--no-gpt2`` for the tiny config only); writes
``bench/results/timellm_step.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2Model

from timellm import build_model, data_provider, get_preset
from timellm.model import Backbone, TimeLLM, TimeLLMConfig
from timellm.model.prompt import build_prompts_reference, tokenize_reference
from timellm.model.tiny import tiny_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "timellm_step.md"
STAGES = ("data", "prompt", "mapping", "reprogram", "llm_fwd", "backward", "optimizer")


@dataclass
class Timings:
    per_stage: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    total: list[float] = field(default_factory=list)
    eval: list[float] = field(default_factory=list)

    def median(self, stage: str) -> float:
        return statistics.median(self.per_stage[stage]) * 1e3

    def median_total(self) -> float:
        return statistics.median(self.total) * 1e3


class _Clock:
    def __init__(self, timings: Timings):
        self.timings, self.last = timings, time.perf_counter()
        self.start = self.last

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings.per_stage[stage].append(now - self.last)
        self.last = now


def _ours_prompt(model: TimeLLM, x_norm: torch.Tensor) -> torch.Tensor:
    return model.prompt_ids(x_norm)


def _upstream_prompt(model: TimeLLM, x_norm: torch.Tensor) -> torch.Tensor:
    B, T, N = x_norm.shape
    series = x_norm.permute(0, 2, 1).contiguous().reshape(B * N, T, 1)
    texts = build_prompts_reference(series, model.description, model.seq_len, model.pred_len)
    return tokenize_reference(model.tokenizer, texts)


@contextmanager
def _upstream_llm_settings(model: TimeLLM) -> Iterator[None]:
    """Upstream sets output_attentions/output_hidden_states on the LLM config."""
    cfg = model.llm_model.config
    before = cfg._attn_implementation
    model.llm_model.set_attn_implementation("eager")
    cfg.output_attentions = cfg.output_hidden_states = True
    try:
        yield
    finally:
        cfg.output_attentions = cfg.output_hidden_states = False
        model.llm_model.set_attn_implementation(before)


def _step(
    model: TimeLLM,
    batches: Iterator,
    opt: torch.optim.Optimizer,
    prompt_fn: Callable,
    timings: Timings,
) -> None:
    clock = _Clock(timings)
    x, y, _, _ = next(batches)
    x, y = x.float(), y[:, -model.pred_len :].float()
    clock.lap("data")
    x_norm, stats = model.normalize_layers.norm(x)
    prompt_embeddings = model.llm_model.get_input_embeddings()(prompt_fn(model, x_norm))
    clock.lap("prompt")
    prototypes = model.text_prototypes()
    clock.lap("mapping")
    patches = model.reprogram(x_norm, prototypes)
    clock.lap("reprogram")
    out = model.decode(prompt_embeddings, patches, n_vars=x.shape[-1])
    loss = torch.nn.functional.mse_loss(model.normalize_layers.denorm(out.float(), stats), y)
    clock.lap("llm_fwd")
    loss.backward()
    clock.lap("backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    timings.total.append(clock.last - clock.start)


def _upstream_forward(model: TimeLLM, x: torch.Tensor) -> torch.Tensor:
    """Upstream's forward: prompt loop, and the text prototypes recomputed on every call."""
    x_norm, stats = model.normalize_layers.norm(x)
    emb = model.llm_model.get_input_embeddings()(_upstream_prompt(model, x_norm))
    out = model.decode(emb, model.reprogram(x_norm, model._map_vocabulary()), x.shape[-1])
    return model.normalize_layers.denorm(out.float(), stats)


def _check_staged_equals_forward(model: TimeLLM, batch: tuple) -> None:
    """The upstream-style path must compute what model.forward does (eval: no dropout)."""
    model.eval()
    with torch.no_grad():
        x = batch[0].float()
        torch.testing.assert_close(_upstream_forward(model, x), model(x))
    model.train()


def _time_eval(model: TimeLLM, batches: Iterator, results: dict[str, Timings], steps: int) -> None:
    """Validation-style forward (eval, no grad): ours reuses the cached text prototypes."""
    model.eval()
    with torch.no_grad():
        for i in range(steps + 1):  # the first round is warm-up
            x = next(batches)[0].float()
            for path in ("ours", "upstream") if i % 2 == 0 else ("upstream", "ours"):
                start = time.perf_counter()
                if path == "ours":
                    model(x)
                else:
                    with _upstream_llm_settings(model):
                        _upstream_forward(model, x)
                if i:
                    results[path].eval.append(time.perf_counter() - start)
    model.train()


def prompt_micro(
    model: TimeLLM, sizes: tuple[int, ...] = (2, 32, 256), reps: int = 30
) -> list[str]:
    """The prompt stage alone (statistics -> padded ids), repeated: robust to machine noise."""
    lines = [
        f"### Prompt stage alone (tiny-cpu tokenizer, seq_len 96; median of {reps} calls, ms)",
        "",
        "| series per batch | ours | upstream | upstream / ours |",
        "|---:|---:|---:|---:|",
    ]
    g = torch.Generator().manual_seed(0)
    paths = {"ours": _ours_prompt, "upstream": _upstream_prompt}
    for n in sizes:
        x = torch.randn(n, model.seq_len, 1, generator=g)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(reps + 1):  # interleaved, so both see the same machine; first: warm-up
            for name, fn in paths.items():
                start = time.perf_counter()
                fn(model, x)
                if i:
                    times[name].append(time.perf_counter() - start)
        a, b = (statistics.median(times[name]) * 1e3 for name in paths)
        lines.append(f"| {n} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return [*lines, ""]


def run_setup(
    label: str, cfg: TimeLLMConfig, model: TimeLLM, steps: int, warmup: int
) -> dict[str, Timings]:
    _, loader = data_provider(cfg, "train")
    batches = iter(loader)
    _check_staged_equals_forward(model, next(iter(loader)))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=cfg.learning_rate)
    results = {"ours": Timings(), "upstream": Timings()}
    for i in range(warmup + steps):
        sink = results if i >= warmup else {"ours": Timings(), "upstream": Timings()}
        # Alternate which path goes first: the second of a pair runs on a warmer allocator.
        for path in ("ours", "upstream") if i % 2 == 0 else ("upstream", "ours"):
            if path == "ours":
                _step(model, batches, opt, _ours_prompt, sink["ours"])
            else:
                with _upstream_llm_settings(model):
                    _step(model, batches, opt, _upstream_prompt, sink["upstream"])
    _time_eval(model, batches, results, max(2, steps // 2))
    ours, up = results["ours"].median_total(), results["upstream"].median_total()
    print(f"{label}: ours {ours:.0f} ms/step, upstream {up:.0f} ms/step")
    return results


def gpt2_shaped(cfg: TimeLLMConfig) -> TimeLLM:
    """GPT-2-small-shaped random backbone (vocab 50257, width 768, 6 layers, GPT-2 dropout)."""
    tokenizer = tiny_tokenizer("gpt2")  # ids < 2.6k: fine for timing, the vocab size is what counts
    config = GPT2Config(vocab_size=50257, n_embd=768, n_layer=cfg.llm_layers, n_head=12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llm = GPT2Model(config)
    llm.config.use_cache = False
    llm.requires_grad_(False)
    return build_model(cfg, Backbone(llm, tokenizer, "random-gpt2-shape", torch.float32))


def _table(label: str, cfg: TimeLLMConfig, results: dict[str, Timings], steps: int) -> list[str]:
    ours, up = results["ours"], results["upstream"]
    lines = [
        f"### {label}",
        "",
        f"seq_len {cfg.seq_len}, pred_len {cfg.pred_len}, batch {cfg.batch_size}, "
        f"llm_layers {cfg.llm_layers}, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
        f"num_tokens {cfg.num_tokens}, {cfg.dtype}; median of {steps} steps (ms)",
        "",
        "| stage | ours | upstream | upstream / ours |",
        "|---|---:|---:|---:|",
    ]
    for stage in STAGES:
        a, b = ours.median(stage), up.median(stage)
        lines.append(f"| {stage} | {a:.1f} | {b:.1f} | {b / a if a else float('nan'):.2f}x |")
    a, b = ours.median_total(), up.median_total()
    lines.append(f"| **train step total** | **{a:.1f}** | **{b:.1f}** | **{b / a:.2f}x** |")
    a, b = (statistics.median(t.eval) * 1e3 for t in (ours, up))
    lines += [f"| eval forward (no grad) | {a:.1f} | {b:.1f} | {b / a:.2f}x |", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path (tiny)")
    parser.add_argument("--gpt2-steps", type=int, default=3, help="timed steps per path (GPT-2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2-shaped config")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    sections = []
    tiny = get_preset("tiny-cpu")
    tiny_model = build_model(tiny)
    results = run_setup("tiny-cpu", tiny, tiny_model, args.steps, args.warmup)
    sections += _table(
        "tiny-cpu (random 2-layer GPT-2 shape, hidden 64)", tiny, results, args.steps
    )
    sections += prompt_micro(tiny_model)
    if not args.no_gpt2:
        g = get_preset(
            "gpt2-etth1",
            llm="random-gpt2-shape",
            dtype="fp32",
            seq_len=96,
            pred_len=24,
            batch_size=2,
        )
        results = run_setup("gpt2-shape", g, gpt2_shaped(g), args.gpt2_steps, 1)
        sections += _table(
            "GPT-2-small shape (random, vocab 50257, 6 of 12 layers, hidden 768)",
            g,
            results,
            args.gpt2_steps,
        )

    header = [
        "# Time-LLM training step: ours vs upstream's path",
        "",
        f"`python -m bench.bench_timellm_step` on {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"whole run {time.perf_counter() - started:.0f} s, 1-min load average "
        f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} (a shared machine: compare the two "
        "columns, not absolute times across runs). Same model, weights and batches for "
        "both paths, steps interleaved. Stages: data (DataLoader), prompt (statistics, text, "
        "tokens, embedding lookup), mapping (vocab -> text prototypes), reprogram (patching + "
        "cross-attention), llm_fwd (LLM + head + loss), backward, optimizer (Adam).",
        "",
        "Upstream path: per-sample prompt loop + whole-prompt tokenization (same fast tokenizer as "
        "ours), LLM with output_attentions/output_hidden_states (eager attention). The model math "
        "is identical; outputs agree to float tolerance. Stages under ~20 ms in the GPT-2 "
        "section move with allocator noise (large buffers freed and re-faulted between stages); "
        "the prompt-only table isolates that stage. In the GPT-2 shape a training step is "
        "dominated by the vocabulary-wide mapping layer (50257 x 768 x 1000, forward and weight "
        "gradient) and the frozen LLM under GPT-2's dropout (which on CPU rules out the fused "
        "attention kernel), the same math on both paths; eval gains from the cached text "
        "prototypes.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
