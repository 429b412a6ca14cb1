"""ReplayLog: what a replacement unit must receive again, and a unit killed anywhere catches up bitwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zetta_ray.actors import ComputeUnit
from zetta_ray.actors.wire import to_wire
from zetta_ray.control import ReplayLog, ReplayUnavailableError
from zetta_ray.experts import ExpertFFN

pytestmark = pytest.mark.unit

D = 4
KEYS = [(0, 0), (0, 1), (1, 0)]
STEPS = 4


def test_calls_are_kept_in_send_order_and_committed_by_step():
    log = ReplayLog()
    x, dy = np.ones((2, D), np.float32), np.zeros((2, D), np.float32)
    log.record_forward(0, (0, 0, 0), [1], [2], x, True, 1)
    log.record_backward(0, (0, 0, 0), dy, 1)
    log.record_step(0, 0, 1)
    log.record_forward(0, (1, 0, 0), [1], [2], x, True, 2)
    log.record_forward(1, (1, 0, 0), [0], [2], x, True, 2)
    assert [c.method for c in log.calls_for(0, 0)] == ["forward", "backward", "step", "forward"]
    assert log.calls_for(0, 0)[0].args == ((0, 0, 0), [1], [2], x, True, 1)
    assert log.calls_for(0, 0)[1].key == (0, 0, 0) and log.calls_for(0, 0)[2].key is None
    assert [c.method for c in log.calls_for(0, 1)] == ["forward"]
    assert log.nbytes() == 3 * x.nbytes + dy.nbytes and len(log) == 5
    assert log.units() == [0, 1] and log.steps(0) == [0, 1]
    assert log.commit(1) == 3
    assert log.first_step(0) == 1 and len(log) == 2
    with pytest.raises(
        ReplayUnavailableError, match="step 0 cannot be brought forward: the replay log starts at step 1"
    ):
        log.calls_for(0, 0)
    with pytest.raises(ValueError, match="cannot log a step call of step 0: steps before 1 are committed"):
        log.record_step(0, 0)


def test_commit_of_one_unit_leaves_the_others():
    log = ReplayLog()
    for u in (0, 1):
        log.record_step(u, 0)
        log.record_step(u, 1)
    assert log.commit(1, unit=0) == 1
    assert (log.first_step(0), log.first_step(1)) == (1, 0)
    assert len(log.calls_for(1, 0)) == 2
    log.commit(2)
    assert log.units() == [] and log.first_step(1) == 2


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("call"), st.integers(0, 2), st.integers(0, 3)),
            st.tuples(st.just("commit"), st.none() | st.integers(0, 2), st.integers(0, 4)),
        ),
        max_size=40,
    ),
    st.integers(0, 2),
    st.integers(0, 4),
)
def test_the_log_replays_exactly_the_uncommitted_calls_in_order(ops, unit, since):
    log, sent, floor = ReplayLog(), [], {0: 0, 1: 0, 2: 0}
    for i, (op, u, step) in enumerate(ops):
        if op == "call":
            if step < floor[u]:
                with pytest.raises(ValueError):
                    log.record_step(u, step, i)
                continue
            log.record_step(u, step, i)
            sent.append((u, step, i))
        else:
            for v in [u] if u is not None else list(floor):
                floor[v] = max(floor[v], step)
            log.commit(step, unit=u)
    if since < floor[unit]:
        with pytest.raises(ReplayUnavailableError):
            log.calls_for(unit, since)
        return
    got = [(c.step, c.args[1]) for c in log.calls_for(unit, since)]
    assert got == [(s, i) for u, s, i in sent if u == unit and s >= since]


# -- a unit killed at any point catches up bitwise -------------------------------------------------------


def _unit() -> ComputeUnit:
    return ComputeUnit(0, {k: ExpertFFN(D, 8).to("meta") for k in KEYS})


def _trained_start() -> ComputeUnit:
    torch.manual_seed(0)
    unit = _unit()
    unit.load_state_dict(
        {f"{l}.{e}.{n}": to_wire(t) for (l, e) in KEYS for n, t in ExpertFFN(D, 8).state_dict().items()}
    )
    unit.set_optimizer(torch.optim.AdamW, {"lr": 0.05})
    return unit


def _events() -> list[tuple]:
    """What a controller sends one unit over STEPS steps, with a snapshot after every step."""
    events: list[tuple] = []
    for step in range(STEPS):
        epoch = step + 1
        for layer, (experts, counts) in enumerate([([0, 1], [3, 2]), ([0], [5])]):
            g = torch.Generator().manual_seed(10 * step + layer)
            x, dy = torch.randn(5, D, generator=g).numpy(), torch.randn(5, D, generator=g).numpy()
            key = (step, layer, 0)
            events.append(("forward", key, experts, counts, x, True, epoch))
            events.append(("backward", key, dy, epoch))
        events.append(("step", step, epoch))
        events.append(("snapshot", step + 1))
    return events


def _send(unit: ComputeUnit, log: ReplayLog | None, event: tuple) -> object:
    method, *args = event
    if log is not None:
        getattr(log, f"record_{method}")(0, *args)
    return getattr(unit, method)(*args)


def _run(kill_at: int | None) -> tuple[ComputeUnit, list[object]]:
    """Run all events; if ``kill_at`` is set, the unit dies just before event ``kill_at`` and a fresh one
    takes over: restore the newest stored snapshot, replay the log, go on."""
    events = _events()
    unit, log, stored, results = _trained_start(), ReplayLog(), {0: _trained_start().snapshot(0)}, []
    for i, event in enumerate(events):
        if i == kill_at:
            newest = max(stored)
            unit = _unit()
            torch.manual_seed(12345)  # the replacement's process starts from another RNG state
            assert unit.restore(stored[newest]) == newest
            replayed = [getattr(unit, c.method)(*c.args) for c in log.calls_for(0, newest)]
            # The replayed calls give the results the dead unit gave (the controller may await some).
            assert all(
                np.array_equal(a, b)
                for a, b in zip(replayed, results[len(results) - len(replayed) :], strict=True)
            )
        if event[0] == "snapshot":
            stored[event[1]] = unit.snapshot(event[1])
            log.commit(event[1])  # stored on every replica: earlier calls are no longer needed
        else:
            results.append(_send(unit, log, event))
    return unit, results


@pytest.fixture(scope="module")
def reference(one_thread):
    return _run(kill_at=None)


@pytest.mark.parametrize("kill_at", range(len(_events())))
def test_a_unit_killed_before_any_call_ends_bitwise_like_the_one_that_never_died(reference, kill_at):
    ref_unit, ref_results = reference
    unit, results = _run(kill_at)
    assert unit.steps_applied == ref_unit.steps_applied == STEPS
    for key in KEYS:
        for a, b in zip(ref_unit.experts[key].parameters(), unit.experts[key].parameters(), strict=True):
            assert torch.equal(a, b)
    ref_opt, opt = ref_unit.optimizer.state_dict()["state"], unit.optimizer.state_dict()["state"]
    assert all(torch.equal(ref_opt[i][n], opt[i][n]) for i in ref_opt for n in ref_opt[i])
    assert all(np.array_equal(a, b) for a, b in zip(ref_results, results, strict=True))


def test_a_unit_that_died_before_its_first_step_replays_set_optimizer():
    """The step-0 snapshot was taken before the optimizer existed; the logged set_optimizer rebuilds it."""
    torch.manual_seed(0)
    unit, log = _unit(), ReplayLog()
    unit.load_state_dict(
        {f"{l}.{e}.{n}": to_wire(t) for (l, e) in KEYS for n, t in ExpertFFN(D, 8).state_dict().items()}
    )
    blob = unit.snapshot(0)
    reference = _unit()
    reference.restore(blob)
    for u in (unit, reference):
        u.set_optimizer(torch.optim.SGD, {"lr": 0.1})
    log.record(0, "set_optimizer", 0, (torch.optim.SGD, {"lr": 0.1}))
    events = [e for e in _events() if e[0] != "snapshot"][:5]  # step 0: two layers, then the step
    for event in events:
        _send(unit, log, event)
        _send(reference, None, event)
    replacement = _unit()
    replacement.set_optimizer(torch.optim.AdamW, {"lr": 1.0})  # whatever it had is replaced
    assert replacement.restore(blob) == 0 and replacement.optimizer is None
    for call in log.calls_for(0, 0):
        getattr(replacement, call.method)(*call.args)
    assert [c.method for c in log.calls_for(0, 0)][:2] == ["set_optimizer", "forward"]
    assert log.calls_for(0, 0)[0].key is None
    assert isinstance(replacement.optimizer, torch.optim.SGD) and replacement.steps_applied == 1
    for key in KEYS:
        for a, b in zip(
            reference.experts[key].parameters(), replacement.experts[key].parameters(), strict=True
        ):
            assert torch.equal(a, b)
