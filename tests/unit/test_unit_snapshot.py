"""A unit restored from its snapshot continues bitwise like the unit that never stopped (no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch

from zetta_ray.actors import ComputeUnit
from zetta_ray.actors.snapshot import restore_unit, unit_gradients, unit_snapshot
from zetta_ray.actors.wire import to_wire
from zetta_ray.checkpoint import CorruptCheckpointError, decode_snapshot, encode_snapshot
from zetta_ray.experts import ExpertFFN

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

KEYS = [(0, 1), (0, 3), (1, 0)]
D = 4


def _skeletons() -> dict[tuple[int, int], torch.nn.Module]:
    return {k: ExpertFFN(D, 8).to("meta") for k in KEYS}


def _fresh_unit() -> ComputeUnit:
    return ComputeUnit(7, _skeletons())


def _trained_unit() -> ComputeUnit:
    torch.manual_seed(0)
    experts = {k: ExpertFFN(D, 8) for k in KEYS}
    unit = _fresh_unit()
    unit.load_state_dict(
        {f"{l}.{e}.{n}": to_wire(t) for (l, e), m in experts.items() for n, t in m.state_dict().items()}
    )
    unit.set_optimizer(torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "betas": (0.8, 0.9)})
    return unit


def _batch(step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + layer)
    return torch.randn(7, D, generator=g), torch.randn(7, D, generator=g)


def _train(unit: ComputeUnit, steps: range) -> None:
    """One forward and backward per layer per step (uneven rows per expert), then the step."""
    for step in steps:
        for layer, (experts, counts) in enumerate([([1, 3], [4, 3]), ([0], [7])]):
            x, dy = _batch(step, layer)
            unit.forward((step, layer, 0), experts, counts, x.numpy(), keep=True, grad_epoch=step + 1)
            unit.backward((step, layer, 0), dy.numpy(), grad_epoch=step + 1)
        unit.step(step, grad_epoch=step + 1)


def _assert_same_state(a: ComputeUnit, b: ComputeUnit) -> None:
    for key in KEYS:
        for (name, pa), (_, pb) in zip(
            a.experts[key].named_parameters(), b.experts[key].named_parameters(), strict=True
        ):
            assert torch.equal(pa, pb), f"{key} {name} differs"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for name, t in sa["state"][i].items():
            assert torch.equal(t, sb["state"][i][name]), f"optimizer state {i}/{name} differs"
    assert a.steps_applied == b.steps_applied


def test_restored_unit_continues_bitwise_like_the_one_that_never_stopped():
    unit = _trained_unit()
    _train(unit, range(3))
    blob = unit.snapshot(3)
    rng_at_snapshot = torch.get_rng_state()
    _train(unit, range(3, 5))
    rng_after = torch.get_rng_state()

    torch.manual_seed(999)  # the replacement's process starts with another RNG state
    fresh = _fresh_unit()  # no weights, no optimizer: everything comes from the snapshot
    assert fresh.restore(blob) == 3
    assert torch.equal(torch.get_rng_state(), rng_at_snapshot)
    assert fresh.steps_applied == 3
    assert isinstance(fresh.optimizer, torch.optim.AdamW)
    _train(fresh, range(3, 5))
    _assert_same_state(unit, fresh)
    assert torch.equal(torch.get_rng_state(), rng_after)


def test_snapshot_captures_every_parameter_the_optimizer_and_the_counters():
    unit = _trained_unit()
    _train(unit, range(2))
    snap = unit_snapshot(unit, 2)
    assert snap.step == 2
    assert sorted(snap.tensors) == sorted(f"{l}.{e}.{n}" for l, e in KEYS for n in ("w1.weight", "w2.weight"))
    assert len(snap.optimizer["state"]) == 2 * len(KEYS)
    assert set(snap.optimizer["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert snap.optimizer["param_groups"][0]["betas"] == (0.8, 0.9)
    assert snap.extra == {"steps_applied": 2, "grad_epoch": 2, "optimizer_class": "AdamW"}
    assert snap.mesh == {"unit": 7, "experts": [list(k) for k in KEYS]}
    # The snapshot is a copy: training on does not change it.
    before = snap.tensors["0.1.w1.weight"].copy()
    _train(unit, range(2, 3))
    assert (snap.tensors["0.1.w1.weight"] == before).all()
    # Round trip through bytes keeps every value and type.
    again = decode_snapshot(encode_snapshot(snap))
    assert again.optimizer["param_groups"] == snap.optimizer["param_groups"]


def test_restore_into_a_unit_with_an_optimizer_and_pending_activations_rolls_it_back():
    unit = _trained_unit()
    _train(unit, range(1))
    blob = unit.snapshot(1)
    expected = copy.deepcopy(unit.optimizer.state_dict())
    _train(unit, range(1, 3))
    unit.forward((3, 0, 0), [1], [2], torch.randn(2, D).numpy(), keep=True, grad_epoch=4)
    assert unit.restore(blob) == 1
    assert unit.saved_keys == [] and unit.steps_applied == 1
    assert all(p.grad is None for m in unit.experts.values() for p in m.parameters())
    for i, state in expected["state"].items():
        assert torch.equal(unit.optimizer.state_dict()["state"][i]["exp_avg"], state["exp_avg"])


def test_restore_refuses_a_snapshot_of_other_experts_or_another_optimizer():
    unit = _trained_unit()
    _train(unit, range(1))
    blob = unit.snapshot(1)
    other = ComputeUnit(8, {(0, 1): ExpertFFN(D, 8).to("meta")})
    with pytest.raises(ValueError, match=r"cannot restore unit 8, which hosts experts \[\(0, 1\)\]"):
        other.restore(blob)
    sgd = _fresh_unit()
    sgd.set_optimizer(torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(ValueError, match="has a SGD optimizer but the snapshot holds AdamW state"):
        sgd.restore(blob)


def test_a_custom_optimizer_must_be_set_before_restoring():
    class Custom(torch.optim.SGD):
        pass

    unit = _trained_unit()
    unit.set_optimizer(Custom, {"lr": 0.1})
    _train(unit, range(1))
    with pytest.raises(ValueError, match="'Custom', which is not a torch.optim class; call set_optimizer"):
        _fresh_unit().restore(unit.snapshot(1))
    replacement = _fresh_unit()
    replacement.set_optimizer(Custom, {"lr": 0.1})
    assert replacement.restore(unit.snapshot(1)) == 1


def test_a_corrupted_blob_is_refused_naming_the_tensor():
    unit = _trained_unit()
    blob = bytearray(encode_snapshot(unit.snapshot(0)))
    blob[-3] ^= 0xFF  # the last tensor's bytes
    with pytest.raises(CorruptCheckpointError, match="sha256 mismatch"):
        _fresh_unit().restore(bytes(blob))


def test_restore_unit_accepts_a_snapshot_object():
    unit = _trained_unit()
    _train(unit, range(2))
    fresh = _fresh_unit()
    assert restore_unit(fresh, unit_snapshot(unit, 2)) == 2
    _train(unit, range(2, 3))
    _train(fresh, range(2, 3))
    _assert_same_state(unit, fresh)


def _train_recording(unit: ComputeUnit, steps: range, lrs: dict[int, float] | None = None) -> list:
    """``_train``, taking each step's gradient record right after it (as the fault manager does); a step
    in ``lrs`` runs with that learning rate (a schedule the controller applies)."""
    records = []
    for step in steps:
        if lrs and step in lrs:
            for group in unit.optimizer.param_groups:
                group["lr"] = lrs[step]
        _train(unit, range(step, step + 1))
        records.append(unit_gradients(unit, step + 1))
    return records


def test_a_full_snapshot_and_the_gradient_records_after_it_restore_bitwise():
    unit = _trained_unit()
    _train(unit, range(2))
    base = unit.snapshot(2)
    records = _train_recording(unit, range(2, 5), lrs={3: 0.01})  # steps 3, 4, 5; step 4 at another lr
    rng_at_5 = torch.get_rng_state()
    assert [r.step for r in records] == [3, 4, 5] and all(r.is_gradient_record for r in records)
    rng = base.rng["torch"].nbytes  # gradients only: a third of the parameters and AdamW's two moments
    assert 3 * (records[0].nbytes - rng) <= base.nbytes - rng < 3 * (records[0].nbytes - rng) + 100
    assert records[1].optimizer["param_groups"][0]["lr"] == 0.01

    torch.manual_seed(999)
    fresh = _fresh_unit()
    assert [fresh.restore(s) for s in (base, *records)] == [2, 3, 4, 5]
    _assert_same_state(unit, fresh)
    assert torch.equal(torch.get_rng_state(), rng_at_5)
    assert all(p.grad is None for m in fresh.experts.values() for p in m.parameters())
    _train(unit, range(5, 7))
    _train(fresh, range(5, 7))
    _assert_same_state(unit, fresh)


def test_an_expert_without_rows_keeps_no_gradient_and_its_parameters_stay_unchanged_on_redo():
    unit = _trained_unit()
    base = unit.snapshot(0)
    for layer, (experts, counts) in enumerate([([1], [7]), ([0], [7])]):  # expert (0, 3) gets no rows
        x, dy = _batch(0, layer)
        unit.forward((0, layer, 0), experts, counts, x.numpy(), keep=True, grad_epoch=1)
        unit.backward((0, layer, 0), dy.numpy(), grad_epoch=1)
    unit.step(0, grad_epoch=1)
    record = unit_gradients(unit, 1)
    assert not any(name.startswith("0.3.") for name in record.tensors)
    fresh = _fresh_unit()
    fresh.restore(base)
    assert fresh.restore(record) == 1
    _assert_same_state(unit, fresh)


def test_gradient_records_out_of_order_or_without_a_base_are_refused():
    unit = _trained_unit()
    base = unit.snapshot(0)
    records = _train_recording(unit, range(2))
    with pytest.raises(RuntimeError, match="needs the unit's state after step 0 first"):
        _fresh_unit().restore(records[0])
    fresh = _fresh_unit()
    fresh.restore(base)
    with pytest.raises(ValueError, match="has applied 0 optimizer steps, but the gradient record of step 2"):
        fresh.restore(records[1])
