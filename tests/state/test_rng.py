from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
import torch

from ckptkit.errors import IncompatibleCheckpointError
from ckptkit.state import RNGState


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def extra_generators() -> list:
    return [
        np.random.default_rng(1),
        np.random.Generator(np.random.MT19937(2)),
        np.random.Generator(np.random.Philox(3)),
        np.random.Generator(np.random.SFC64(4)),
        torch.Generator().manual_seed(5),
    ]


def draw(generators: list) -> list:
    """A few draws from every RNG, including the cached-Gaussian paths."""
    out: list = [random.random(), random.gauss(0, 1), np.random.rand(3).tolist()]
    out += [np.random.standard_normal(), torch.rand(3).tolist(), torch.randn(1).item()]
    for gen in generators:
        if isinstance(gen, torch.Generator):
            out.append(torch.rand(2, generator=gen).tolist())
        else:
            out += [gen.random(2).tolist(), gen.integers(0, 2**31, 3, dtype=np.uint32).tolist()]
    return out


def test_restore_repeats_every_generator_after_weights_only_roundtrip() -> None:
    generators = extra_generators()
    rng = RNGState(generators)
    draw(generators)
    state = roundtrip(rng.state_dict())
    expected = [draw(generators) for _ in range(3)]

    rng.load_state_dict(state)

    assert [draw(generators) for _ in range(3)] == expected


def test_restore_into_fresh_objects() -> None:
    """A resumed process builds new generators; the checkpoint drives them all."""
    generators = extra_generators()
    draw(generators)
    state = roundtrip(RNGState(generators).state_dict())
    expected = draw(generators)

    fresh = [np.random.default_rng(99), np.random.Generator(np.random.MT19937(99))]
    fresh += [np.random.Generator(np.random.Philox(99)), np.random.Generator(np.random.SFC64(99))]
    fresh.append(torch.Generator().manual_seed(99))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    RNGState(fresh).load_state_dict(state)

    assert draw(fresh) == expected


def test_state_holds_only_tensors_and_plain_values() -> None:
    def check(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, str)
                check(item)
        elif isinstance(value, list | tuple):
            for item in value:
                check(item)
        else:
            assert value is None or isinstance(value, torch.Tensor | int | float | bool | str)

    check(RNGState(extra_generators()).state_dict())


def test_generator_count_mismatch_raises_and_changes_nothing() -> None:
    state = RNGState([torch.Generator()]).state_dict()
    before = torch.get_rng_state()
    torch.rand(1)
    after = torch.get_rng_state()

    with pytest.raises(IncompatibleCheckpointError, match="same generators"):
        RNGState().load_state_dict(state)

    assert not torch.equal(before, after)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize(
    ("saved", "now", "match"),
    [
        (torch.Generator(), np.random.default_rng(), "torch generator"),
        (np.random.default_rng(), np.random.Generator(np.random.Philox()), "PCG64"),
    ],
)
def test_generator_kind_mismatch_raises(saved: object, now: object, match: str) -> None:
    state = RNGState([saved]).state_dict()
    with pytest.raises(IncompatibleCheckpointError, match=match):
        RNGState([now]).load_state_dict(state)


def test_rejects_non_generator() -> None:
    with pytest.raises(TypeError, match="numpy.random.Generator or torch.Generator"):
        RNGState([random.Random()])  # type: ignore[list-item]


def test_missing_keys_raise() -> None:
    with pytest.raises(IncompatibleCheckpointError, match="lacks"):
        RNGState().load_state_dict({"python": {}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cuda_state_on_cpu_machine_warns_and_restores_the_rest() -> None:
    state = RNGState().state_dict()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    expected = torch.rand(3)

    with pytest.warns(UserWarning, match="CUDA is not available"):
        RNGState().load_state_dict(state)

    assert torch.equal(torch.rand(3), expected)


def test_cuda_device_count_mismatch_restores_matching_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((d, s)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    state = RNGState().state_dict()
    device_states = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    state["cuda"] = device_states

    with pytest.warns(UserWarning, match="restoring devices 0..0 only"):
        RNGState().load_state_dict(state)

    assert [d for d, _ in restored] == [0]
    assert torch.equal(restored[0][1], device_states[0])


def test_no_warning_without_cuda_state() -> None:
    state = RNGState().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RNGState().load_state_dict(roundtrip(state))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_restored() -> None:
    rng = RNGState()
    state = roundtrip(rng.state_dict())
    expected = torch.rand(4, device="cuda").cpu()
    rng.load_state_dict(state)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)
