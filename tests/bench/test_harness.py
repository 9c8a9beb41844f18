"""The benchmark harness's own rules: interleaving, warm-up, targets, the state's shape."""

from __future__ import annotations

import pytest

from bench import _harness
from bench.__main__ import parse


def test_interleaved_rotates_the_order_and_drops_the_warmup_round() -> None:
    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = _harness.interleaved(cases, reps=3, warmup=True)
    assert [len(s.values) for s in out.values()] == [3, 3, 3]  # warm-up not counted
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 4
    # Each case leads one round: none always runs first (a cold cache) or last.
    assert {r[0] for r in rounds[1:]} == {"a", "b", "c"}


def test_before_and_after_run_around_every_call() -> None:
    log: list[str] = []
    _harness.interleaved(
        {"x": lambda: log.append("x")},
        reps=2,
        before=lambda n: log.append(f"before {n}"),
        after=lambda n: log.append(f"after {n}"),
        warmup=False,
    )
    assert log == ["before x", "x", "after x"] * 2


def test_samples_show_the_median_and_the_spread() -> None:
    s = _harness.Samples([0.3, 0.1, 0.2])
    assert s.show() == "0.20 s (0.10–0.30)"
    assert _harness.Samples([0.5]).show("ms", 1e3, 0) == "500 ms"
    assert s.scaled(10).median == pytest.approx(2.0)


def test_targets_written_are_read_back() -> None:
    targets = [
        _harness.Target("sync save ≥ 0.9× the disk", "0.25×", False),
        _harness.Target("async blocks ≤ 10 %", _harness.NA, None),
        _harness.Target("maybe_save < 1 %", "0.01%", True),
    ]
    text = "\n\n".join(
        ["# t", "## Targets", _harness.targets_table(targets), "## Other", "| a | b | c |"]
    )
    assert _harness.targets_in(text) == [
        ("sync save ≥ 0.9× the disk", "0.25×", "**FAIL**"),
        ("async blocks ≤ 10 %", _harness.NA, "**n/a**"),
        ("maybe_save < 1 %", "0.01%", "**PASS**"),
    ]


@pytest.mark.parametrize("megabytes", [100, 500, 1000])
def test_the_state_reaches_each_size_with_hundreds_of_tensors(megabytes: int) -> None:
    from bench._state import BYTES_PER_PARAM, LAYERS, Shape

    shape = Shape.for_megabytes(megabytes)
    assert shape.params * BYTES_PER_PARAM == pytest.approx(megabytes * 1e6, rel=0.05)
    assert shape.layers == LAYERS and shape.vocab > 10_000  # GPT-2's proportions, not a few blobs


def test_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--sizes", "100,500", "--reps", "3", "--only", "save,gs"])
    assert args.sizes == [100.0, 500.0] and args.reps == 3 and args.only == ["save", "gs"]
    quick = parse(["--quick"])
    assert quick.reps == 1 and quick.out != _harness.RESULTS  # never over the committed tables
    for bad in (["--only", "sav"], ["--sizes", "100,x"], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)
    assert "unknown section sav" in capsys.readouterr().err
