"""Fault records from the runtime's errors and from a node's death."""

from __future__ import annotations

import socket

import pytest
import ray.exceptions

from zetta_ray.control import Fault, fault_from_error, faults_from_node_death
from zetta_ray.errors import DeadlineExceeded, UnitFailed

pytestmark = pytest.mark.unit

EXPERTS = [(0, 6), (0, 7)]


def test_a_dead_actor_is_a_unit_fault_and_a_raised_error_is_marked_raised():
    died = UnitFailed(
        unit=3, experts=EXPERTS, step=12, phase="backward", cause=ray.exceptions.ActorDiedError()
    )
    fault = fault_from_error(died, node="node-a")
    assert (fault.kind, fault.unit, fault.experts, fault.node, fault.step, fault.phase, fault.raised) == (
        "unit",
        3,
        ((0, 6), (0, 7)),
        "node-a",
        12,
        "backward",
        False,
    )
    assert "ActorDiedError" in fault.detail
    raised = UnitFailed(unit=3, experts=EXPERTS, step=12, phase="forward", cause=RuntimeError("boom"))
    assert fault_from_error(raised).raised
    assert (
        fault_from_error(raised)
        .describe()
        .startswith("unit 3 (experts [L0/E6, L0/E7]) raised an error at step 12, phase 'forward'")
    )


def test_deadline_and_dead_node():
    late = DeadlineExceeded(unit=1, experts=EXPERTS, step=4, phase="optimizer", deadline_s=30)
    assert fault_from_error(late).kind == "deadline"
    assert "missed its deadline at step 4" in fault_from_error(late).describe()
    died = UnitFailed(unit=1, experts=EXPERTS, step=4, phase="forward", cause=RuntimeError("x"))
    lost = fault_from_error(died, node="n1", node_alive=False)
    assert (lost.kind, lost.raised) == ("node", False)
    assert "unit 1 (experts [L0/E6, L0/E7]) on node n1 was lost with its node" in lost.describe()


def test_node_death_gives_one_fault_per_unit_and_pool():
    faults = faults_from_node_death(
        "n2", units={5: [(1, 2)], 4: [(0, 0), (0, 1)]}, pools=["p-b", "p-a"], step=7, phase="forward"
    )
    assert [(f.unit, f.pool) for f in faults] == [(4, None), (5, None), (None, "p-a"), (None, "p-b")]
    assert all(f.kind == "node" and f.node == "n2" and f.step == 7 for f in faults)
    assert faults[2].who == "pool 'p-a' on node n2"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "disk", "unit": 1}, "kind='disk'"),
        ({"kind": "unit", "unit": 1, "phase": "lunch"}, "phase='lunch'"),
        ({"kind": "unit"}, "exactly one actor"),
        ({"kind": "unit", "unit": 1, "pool": 2}, "exactly one actor"),
        ({"kind": "pool", "unit": 1}, "needs pool="),
        ({"kind": "deadline", "pool": 1}, "needs unit="),
    ],
)
def test_invalid_faults_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fault(**({"step": 0, "phase": "forward"} | kwargs))


def test_many_experts_are_shortened():
    fault = Fault(kind="unit", unit=0, experts=tuple((0, e) for e in range(10)), step=0, phase="forward")
    assert fault.who.endswith("L0/E7 (+2 more)])")


def test_raylet_probe_tells_a_listening_raylet_from_a_dead_one():
    """The probe behind ``Liveness.live_nodes`` (control/liveness.py): a node whose raylet port accepts
    is alive, one whose port refuses (the raylet was killed; the cluster has not noticed yet) is dead."""
    from zetta_ray.control.liveness import raylet_answers

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert raylet_answers({"NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port})
    # closed now: nothing listens on the port, the kernel refuses the connection at once
    assert not raylet_answers({"NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port})
