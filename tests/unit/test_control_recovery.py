"""decide_recovery: newest surviving replica, spare first, away from replicas, FAIL with a reason."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zetta_ray.control import Fault, RecoveryAction, Replica, Spare, decide_recovery

pytestmark = pytest.mark.unit

NODES = ["n0", "n1", "n2", "n3"]


def _fault(kind: str = "unit", node: str = "n0", **kw) -> Fault:
    return Fault(kind=kind, unit=3, experts=((0, 6), (0, 7)), node=node, step=12, phase="backward", **kw)


REPLICAS = {3: [("pA", "n1", 11), ("pB", "n2", 11), ("pA", "n1", 10)]}


def test_unit_death_restores_the_newest_replica_on_a_spare(caplog):
    with caplog.at_level(logging.WARNING, logger="zetta_ray.control"):
        d = decide_recovery(
            _fault(),
            live_nodes=NODES,
            replicas_by_unit=REPLICAS,
            spares=[Spare("b0", "n1"), Spare("b1", "n3")],
        )
    assert d.action is RecoveryAction.REPLACE_ON_SPARE
    assert d.spare == Spare("b1", "n3"), "the spare that shares no node with a replica"
    assert (d.node, d.restore_from, d.replay_since) == ("n3", Replica("pA", "n1", 11), 11)
    assert (
        "Deciding to REPLACE_ON_SPARE, since unit 3 (experts [L0/E6, L0/E7]) on node n0 died" in caplog.text
    )
    assert "restore step 11 from pool 'pA' on node n1 (newest of 3 surviving replica(s))" in d.reason


def test_without_spares_a_live_node_with_room_and_no_replica_is_chosen():
    d = decide_recovery(
        _fault(), live_nodes=NODES, replicas_by_unit=REPLICAS, free_slots={"n0": 1, "n1": 3, "n2": 2, "n3": 0}
    )
    assert (d.action, d.node) == (RecoveryAction.REPLACE_ON_NODE, "n0")
    d = decide_recovery(_fault(), live_nodes=NODES, replicas_by_unit=REPLICAS)
    assert d.node == "n3", "prefers a node other than where the unit failed"


def test_a_dead_node_takes_its_replicas_with_it():
    d = decide_recovery(
        _fault("node"), live_nodes=["n1", "n3"], replicas_by_unit={3: [("pB", "n2", 11), ("pA", "n1", 10)]}
    )
    assert d.restore_from == Replica("pA", "n1", 10) and d.replay_since == 10 and d.node == "n3"


def test_a_gradient_record_is_restored_only_from_a_pool_that_holds_its_whole_chain():
    # pool pA holds the full snapshot of step 8 and the records of 9..11; pB lost the record of step 10
    chain_a = [("pA", "n1", 8, 8), ("pA", "n1", 9, 8), ("pA", "n1", 10, 8), ("pA", "n1", 11, 8)]
    chain_b = [("pB", "n2", 8, 8), ("pB", "n2", 9, 8), ("pB", "n2", 11, 8)]
    d = decide_recovery(_fault(), live_nodes=NODES, replicas_by_unit={3: chain_b + chain_a})
    assert d.restore_from == Replica("pA", "n1", 11, 8) and d.restore_from.start == 8
    assert d.replay_since == 11
    assert "restore step 11 (the full snapshot of step 8 and the gradient records of steps 9..11)" in d.reason
    # without pA, pB's newest whole chain ends at step 9
    d = decide_recovery(_fault(), live_nodes=NODES, replicas_by_unit={3: chain_b}, dead_pools={"pA"})
    assert d.restore_from == Replica("pB", "n2", 9, 8)
    # a chain whose full snapshot is gone restores nothing, and the reason says so
    d = decide_recovery(_fault(), live_nodes=NODES, replicas_by_unit={3: chain_b[1:]})
    assert d.action is RecoveryAction.FAIL
    assert "no surviving pool holds a whole chain of its snapshots" in d.reason


def test_dead_pools_and_a_committed_log_rule_replicas_out():
    d = decide_recovery(_fault(), live_nodes=NODES, replicas_by_unit=REPLICAS, dead_pools={"pA"})
    assert d.restore_from == Replica("pB", "n2", 11)
    d = decide_recovery(
        _fault(), live_nodes=NODES, replicas_by_unit={3: [("pA", "n1", 10)]}, log_start=11, durable_uri="/ck"
    )
    assert d.action is RecoveryAction.FAIL
    assert (
        "newest surviving snapshot (step 10) is older than the replay log, which starts at step 11"
        in d.reason
    )
    assert "No durable checkpoint has been written to /ck yet" in d.reason


def test_no_replica_left_fails_naming_the_last_durable_checkpoint():
    d = decide_recovery(
        _fault("node"),
        live_nodes=["n0", "n3"],
        replicas_by_unit=REPLICAS,
        last_durable_step=200,
        durable_uri="s3://b/run",
    )
    assert d.action is RecoveryAction.FAIL and d.node is None and d.restore_from is None
    assert "no replica of its snapshot survives (replicas stored: step 11 in pool 'pA' on n1" in d.reason
    assert "last durable checkpoint is step 200 at s3://b/run and is intact" in d.reason
    assert "--resume --checkpoint-dir s3://b/run" in d.reason
    d = decide_recovery(_fault(), live_nodes=NODES, replicas_by_unit={})
    assert "replicas stored: none" in d.reason and "durable_uri=None" in d.reason


def test_no_capacity_fails():
    d = decide_recovery(
        _fault(), live_nodes=NODES, replicas_by_unit=REPLICAS, free_slots={"n1": 0}, spares=[Spare(0, "n9")]
    )
    assert d.action is RecoveryAction.FAIL
    assert "no spare bundle is left and no live node has room" in d.reason and "'n1': 0" in d.reason


def test_when_only_replica_nodes_have_room_the_reason_says_so():
    d = decide_recovery(_fault(), live_nodes=["n1", "n2"], replicas_by_unit=REPLICAS)
    assert d.node == "n1" and d.restore_from == Replica("pA", "n1", 11), "reads its local replica"
    assert "holds a replica of this unit" in d.reason


def test_a_raised_error_is_not_replayed_and_a_deadline_kills_first():
    d = decide_recovery(
        _fault(raised=True, detail="RuntimeError: bug"), live_nodes=NODES, replicas_by_unit=REPLICAS
    )
    assert d.action is RecoveryAction.FAIL and "would raise the same error" in d.reason
    d = decide_recovery(_fault("deadline"), live_nodes=NODES, replicas_by_unit=REPLICAS)
    assert d.action is RecoveryAction.REPLACE_ON_NODE and d.reason.endswith("kill the stalled actor first")


def test_a_pool_fault_starts_a_new_pool():
    pool = Fault(kind="pool", pool="pA", node="n1", step=5, phase="snapshot")
    d = decide_recovery(pool, live_nodes=NODES, replicas_by_unit=REPLICAS)
    assert (d.action, d.node, d.restore_from) == (RecoveryAction.REPLACE_POOL, "n1", None)
    lost = Fault(kind="node", pool="pA", node="n1", step=5, phase="snapshot")
    d = decide_recovery(
        lost, live_nodes=NODES, replicas_by_unit=REPLICAS, pools_by_node={"n0": 1, "n2": 0, "n3": 0}
    )
    assert d.node == "n2", "a dead node is never chosen, even when a stale list says it is live"
    assert decide_recovery(lost, live_nodes=[], replicas_by_unit={}).action is RecoveryAction.FAIL


@st.composite
def situations(draw):
    nodes = [f"n{i}" for i in range(draw(st.integers(1, 5)))]
    live = draw(st.sets(st.sampled_from(nodes)))
    replicas = draw(
        st.lists(st.tuples(st.integers(0, 5), st.sampled_from(nodes), st.integers(0, 6)), max_size=6)
    )
    spares = draw(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(nodes)), max_size=3))
    free = draw(st.none() | st.dictionaries(st.sampled_from(nodes), st.integers(0, 2)))
    dead_pools = draw(st.sets(st.integers(0, 5), max_size=2))
    log_start = draw(st.none() | st.integers(0, 6))
    kind = draw(st.sampled_from(["unit", "node", "deadline"]))
    return nodes, live, replicas, spares, free, dead_pools, log_start, kind


@settings(max_examples=400, deadline=None)
@given(situations())
def test_decisions_restore_the_newest_usable_replica_onto_a_live_place(situation):
    nodes, live, replicas, spares, free, dead_pools, log_start, kind = situation
    d = decide_recovery(
        Fault(kind=kind, unit=0, node=nodes[0], step=7, phase="forward"),
        live_nodes=live,
        replicas_by_unit={0: replicas},
        spares=spares,
        free_slots=free,
        dead_pools=dead_pools,
        log_start=log_start,
    )
    if kind == "node":
        live = live - {nodes[0]}  # the fault's own node is dead
    usable = [
        Replica(*r)
        for r in replicas
        if r[1] in live and r[0] not in dead_pools and (log_start is None or r[2] >= log_start)
    ]
    live_spares = [Spare(*s) for s in spares if s[1] in live]
    roomy = [n for n in live if free is None or free.get(n, 0) > 0]
    if not usable or not (live_spares or roomy):
        assert d.action is RecoveryAction.FAIL and d.reason
        return
    assert d.restore_from in usable and d.restore_from.step == max(r.step for r in usable)
    assert d.replay_since == d.restore_from.step and d.node in live
    replica_nodes = {r[1] for r in replicas if r[1] in live and r[0] not in dead_pools}
    if live_spares:
        assert (
            d.action is RecoveryAction.REPLACE_ON_SPARE and d.spare in live_spares and d.node == d.spare.node
        )
        if any(s.node not in replica_nodes for s in live_spares):
            assert d.node not in replica_nodes
    else:
        assert d.action is RecoveryAction.REPLACE_ON_NODE and d.node in roomy
        if any(n not in replica_nodes for n in roomy):
            assert d.node not in replica_nodes
