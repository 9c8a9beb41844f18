"""``python -m bench.bench_async_save --quick``: the async-save benchmark runs end to end
(correctness only: it saves sync and async, loops with every save mode (optimizer steps only, and with a forward and backward), writes its
figures); no timing is asserted."""

from __future__ import annotations

import json


def test_the_async_save_benchmark_runs_in_quick_mode(tmp_path, capsys) -> None:
    from bench import bench_async_save

    out = tmp_path / "async.json"
    assert bench_async_save.main(["--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"sync", "blocked", "commit"}
    assert set(res["loops"]) == set(bench_async_save.LOOP_KINDS)
    for per_mode in res["loops"].values():
        assert set(per_mode) == {"none", "sync", "async", "async, rolling"}
        assert all(len(v) == res["reps"] and min(v) > 0 for v in per_mode.values())
    assert all(len(v) == res["reps"] and min(v) > 0 for v in res["rows"].values())
    table = capsys.readouterr().out
    assert "async `save()` blocks" in table and "target ≤ 0.10" in table
