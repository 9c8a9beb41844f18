"""Property tests: whatever the save sequence and settings, rotation never deletes the
best checkpoint, the newest one, or the one the run was restored from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkit import CheckpointManager
from ckptkit.policies import KeepBestK, KeepLastN, select_deletions

metric = st.floats(min_value=-5, max_value=5, allow_nan=False).map(lambda v: round(v, 1))


@dataclass(frozen=True)
class Fake:
    name: str
    step: int
    metrics: dict
    is_best: bool = False


@given(
    values=st.lists(st.one_of(st.none(), metric), min_size=1, max_size=30),
    keep_last=st.integers(1, 5),
    keep_best=st.integers(1, 3),
    mode=st.sampled_from(["min", "max"]),
    protected_index=st.integers(0, 29),
)
@settings(max_examples=300, deadline=None)
def test_select_deletions_keeps_best_newest_and_protected(
    values, keep_last, keep_best, mode, protected_index
):
    ckpts = [
        Fake(f"step-{i:012d}", i, {} if v is None else {"loss": v}) for i, v in enumerate(values)
    ]
    protected = {ckpts[protected_index % len(ckpts)].name}
    policies = [KeepLastN(keep_last), KeepBestK(keep_best, "loss", mode)]
    deleted = {c.name for c in select_deletions(ckpts, policies, protected)}
    kept = [c for c in ckpts if c.name not in deleted]
    assert ckpts[-1] in kept and protected <= {c.name for c in kept}
    scored = [c for c in ckpts if c.metrics]
    if scored:
        sign = 1 if mode == "min" else -1
        best_value = min(sign * c.metrics["loss"] for c in scored)
        assert any(c.metrics and sign * c.metrics["loss"] == best_value for c in kept)
    assert all(c in kept for c in ckpts[-keep_last:])  # the last N, always


@given(
    values=st.lists(metric, min_size=1, max_size=8),
    keep_last=st.integers(1, 3),
    mode=st.sampled_from(["min", "max"]),
    restore_after=st.integers(0, 7),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_the_real_manager_never_deletes_best_current_or_restored(
    tmp_path_factory, values, keep_last, mode, restore_after
):
    run = str(tmp_path_factory.mktemp("run"))
    sign = 1 if mode == "min" else -1
    state = {"w": torch.zeros(3)}
    restored_step = None
    mgr = CheckpointManager(run, keep_last=keep_last, keep_best=1, best_metric="loss", mode=mode)
    try:
        for i, v in enumerate(values):
            step = (i + 1) * 10
            if i == restore_after and i > 0:  # a new process resumes from the latest
                mgr.close()
                mgr = CheckpointManager(
                    run, keep_last=keep_last, keep_best=1, best_metric="loss", mode=mode
                )
                restored_step = mgr.restore(state)
            state["w"] = torch.full((3,), float(v))
            mgr.save(step, state, {"loss": v})
            steps = {c.step: c for c in mgr.list()}
            assert step in steps  # the current one
            best_so_far = min(sign * x for x in values[: i + 1])
            assert any(sign * c.metrics["loss"] == best_so_far for c in steps.values())
            if restored_step is not None:
                assert restored_step in steps
    finally:
        mgr.close()
