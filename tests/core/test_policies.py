"""Save triggers and retention policies, on their own (no files, fake clocks)."""

from __future__ import annotations

import pytest

from ckptkit import ConfigError
from ckptkit.manifest import Manifest, checkpoint_name
from ckptkit.policies import (
    Deadline,
    EveryNSteps,
    EveryTMinutes,
    KeepBestK,
    KeepLastN,
    parse_duration,
    select_deletions,
)
from ckptkit.run import CheckpointInfo


def _ckpts(*metrics: float | None, key: str = "loss", best_at: int | None = None):
    """Checkpoints at steps 1..n with the given metric values (None: not recorded)."""
    out = []
    for step, value in enumerate(metrics, start=1):
        manifest = Manifest(
            step=step,
            files={},
            entries={},
            metrics={} if value is None else {key: value},
            is_best=step == best_at,
        )
        name = checkpoint_name(step)
        out.append(CheckpointInfo(name=name, url=f"/run/{name}", manifest=manifest))
    return out


def _steps(names_or_infos) -> list[int]:
    return sorted(int(n.split("-")[1]) if isinstance(n, str) else n.step for n in names_or_infos)


# -- retention -----------------------------------------------------------------


def test_keep_last_n():
    ckpts = _ckpts(1, 2, 3, 4, 5)
    assert _steps(KeepLastN(2).keep(ckpts)) == [4, 5]
    assert _steps(KeepLastN(10).keep(ckpts)) == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="keep_last must be >= 1"):
        KeepLastN(0)


def test_keep_best_k_min_and_max():
    ckpts = _ckpts(0.5, 0.2, 0.9, 0.1, 0.7)
    assert _steps(KeepBestK(2, "loss", "min").keep(ckpts)) == [2, 4]
    assert _steps(KeepBestK(2, "loss", "max").keep(ckpts)) == [3, 5]
    assert KeepBestK(1, "loss", "max").ranked(ckpts)[0].step == 3


def test_keep_best_ties_go_to_the_older_checkpoint():
    ckpts = _ckpts(0.3, 0.1, 0.1, 0.1)
    assert _steps(KeepBestK(1, "loss").keep(ckpts)) == [2]
    assert _steps(KeepBestK(2, "loss", "max").keep(ckpts)) == [1, 2]


def test_keep_best_ignores_checkpoints_without_the_metric():
    ckpts = _ckpts(None, 0.4, None, 0.6)
    assert _steps(KeepBestK(5, "loss").keep(ckpts)) == [2, 4]
    assert KeepBestK(1, "acc").keep(ckpts) == set()


def test_keep_best_without_metric_keeps_what_early_stopping_marked():
    ckpts = _ckpts(None, None, None, best_at=2)
    assert _steps(KeepBestK(1).keep(ckpts)) == [2]


def test_keep_best_validates():
    with pytest.raises(ConfigError, match="keep_best"):
        KeepBestK(0, "loss")
    with pytest.raises(ConfigError, match="'min' or 'max'"):
        KeepBestK(1, "loss", "lowest")


def test_select_deletions_unions_policies_and_respects_protection():
    ckpts = _ckpts(0.1, 0.5, 0.4, 0.3, 0.9, 0.8)
    policies = [KeepLastN(2), KeepBestK(1, "loss")]
    assert _steps(select_deletions(ckpts, policies, protected=set())) == [2, 3, 4]
    protected = {checkpoint_name(3)}
    assert _steps(select_deletions(ckpts, policies, protected)) == [2, 4]


def test_select_deletions_never_deletes_the_newest_and_nothing_without_policies():
    ckpts = _ckpts(0.1, 0.2, 0.9)
    # Only a best-1 policy: the newest survives anyway.
    assert _steps(select_deletions(ckpts, [KeepBestK(1, "loss")], set())) == [2]
    assert select_deletions(ckpts, [], set()) == []
    assert select_deletions([], [KeepLastN(1)], set()) == []


# -- triggers ------------------------------------------------------------------


def test_every_n_steps():
    trigger = EveryNSteps(100)
    fired = []
    for step in range(1, 401):
        if trigger.reason(step, 0.0):
            fired.append(step)
            trigger.saved(step, 0.0)
    assert fired == [100, 200, 300, 400]
    assert trigger.reason(400, 0.0) is None  # not twice for the same step
    with pytest.raises(ConfigError):
        EveryNSteps(0)


def test_every_t_minutes_with_a_fake_clock():
    trigger = EveryTMinutes(30)
    trigger.saved(0, now=1000.0)
    assert trigger.reason(1, now=1000.0 + 29 * 60) is None
    assert trigger.reason(2, now=1000.0 + 30 * 60) == "every 30 min"
    trigger.saved(2, now=1000.0 + 30 * 60)
    assert trigger.reason(3, now=1000.0 + 31 * 60) is None
    with pytest.raises(ConfigError):
        EveryTMinutes(0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h55m", 6900.0),
        ("90m", 5400.0),
        ("1:55:00", 6900.0),
        ("55:30", 3330.0),
        ("45s", 45.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("2h 30m", 9000.0),
        ("600", 600.0),
        (3600, 3600.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "1h55x", "h", "-5m", "0", "0m", "1::00", -1])
def test_parse_duration_rejects_bad_input(bad):
    with pytest.raises(ConfigError) as err:
        parse_duration(bad)
    assert "\n" not in str(err.value)


def test_deadline_fires_before_the_limit_leaving_room_for_a_step():
    deadline = Deadline(limit=100.0, start=0.0)
    # Steps every 10 s: the last step that fits must end before t=100.
    fired = [t for t in range(10, 100, 10) if deadline.reason(t // 10, float(t))]
    assert fired == [90]  # 90 + one 10 s step reaches the limit


def test_deadline_accounts_for_save_time():
    plain = Deadline(limit=100.0, start=0.0)
    slow_saves = Deadline(limit=100.0, start=0.0, save_time=5.0)
    first_plain = next(t for t in range(10, 101, 10) if plain.reason(t, float(t)))
    first_slow = next(t for t in range(10, 101, 10) if slow_saves.reason(t, float(t)))
    assert first_plain == 90
    assert first_slow == 80  # 80 + a 10 s step + two 5 s saves reaches the limit


def test_deadline_margin():
    deadline = Deadline(limit=100.0, start=0.0, margin=30.0)
    assert deadline.reason(1, 60.0) is None
    assert deadline.reason(2, 70.0) == "time limit"  # 70 + 10 s step + 30 s margin
