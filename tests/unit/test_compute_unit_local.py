"""The ComputeUnit's logic, run in this process (no Ray): the same numbers as local autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from zetta_ray.actors import ComputeUnit
from zetta_ray.actors.wire import to_wire
from zetta_ray.experts import ExpertFFN

pytestmark = pytest.mark.unit


def _unit_and_reference():
    torch.manual_seed(0)
    experts = {(0, 2): ExpertFFN(4, 8), (0, 3): ExpertFFN(4, 8)}
    reference = copy.deepcopy(experts)
    unit = ComputeUnit(1, {k: copy.deepcopy(m).to("meta") for k, m in experts.items()})
    unit.load_state_dict(
        {f"{l}.{e}.{n}": to_wire(t) for (l, e), m in experts.items() for n, t in m.state_dict().items()}
    )
    return unit, reference


def test_forward_backward_step_match_local_autograd():
    unit, ref = _unit_and_reference()
    unit.set_optimizer(torch.optim.AdamW, {"lr": 0.1})
    ref_opt = torch.optim.AdamW([p for k in sorted(ref) for p in ref[k].parameters()], lr=0.1)
    x = torch.randn(5, 4)
    dy = torch.randn(5, 4)
    y = unit.forward((0, 0, 0), [2, 3], [3, 2], x.numpy(), keep=True)
    xr = x.clone().requires_grad_()
    yr = torch.cat([ref[(0, 2)](xr[:3]), ref[(0, 3)](xr[3:])])
    torch.testing.assert_close(torch.from_numpy(y), yr.detach())
    dx = unit.backward((0, 0, 0), dy.numpy())
    yr.backward(dy)
    torch.testing.assert_close(torch.from_numpy(dx), xr.grad)
    unit.step(0)
    ref_opt.step()
    state = unit.state_dict()
    for (l, e), m in ref.items():
        for n, t in m.state_dict().items():
            torch.testing.assert_close(torch.from_numpy(state[f"{l}.{e}.{n}"]), t)
    assert unit.steps_applied == 1


def test_the_engines_packed_calls_are_forward_and_backward():
    """``forward_call``/``backward_call`` (rows, then the other arguments in one tuple, as the engine
    sends them) compute exactly what ``forward``/``backward`` do."""
    unit, _ = _unit_and_reference()
    packed, _ = _unit_and_reference()
    x, dy = torch.randn(5, 4), torch.randn(5, 4)
    y = unit.forward((0, 0, 0), [2, 3], [3, 2], x.numpy(), True, 1, True, None)
    y_packed = packed.forward_call(x.numpy(), ((0, 0, 0), [2, 3], [3, 2], True, 1, True, None))
    assert torch.equal(torch.from_numpy(y_packed), torch.from_numpy(y))
    dx = unit.backward((0, 0, 0), dy.numpy(), 1, None)
    dx_packed = packed.backward_call(dy.numpy(), ((0, 0, 0), 1, None))
    assert torch.equal(torch.from_numpy(dx_packed), torch.from_numpy(dx))
    grads = [p.grad for k in sorted(unit.experts) for p in unit.experts[k].parameters()]
    grads_packed = [p.grad for k in sorted(packed.experts) for p in packed.experts[k].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_packed, strict=True))
    assert packed.calls == unit.calls == {"forward": 1, "backward": 1}


def test_backward_without_forward_names_the_key():
    unit, _ = _unit_and_reference()
    with pytest.raises(RuntimeError, match=r"\(step, layer, micro-batch\)=\(0, 0, 7\)"):
        unit.backward((0, 0, 7), torch.zeros(1, 4).numpy())


def test_step_drops_activations_of_finished_steps_and_no_grad_keeps_none():
    unit, _ = _unit_and_reference()
    unit.set_optimizer(torch.optim.SGD, {"lr": 0.1})
    unit.forward((0, 0, 0), [2], [2], torch.randn(2, 4).numpy(), keep=True)
    unit.forward((0, 0, 1), [2], [2], torch.randn(2, 4).numpy(), keep=False)
    assert len(unit.saved_keys) == 1
    unit.step(0)
    assert len(unit.saved_keys) == 0


def test_load_state_dict_rejects_mismatched_keys():
    unit, _ = _unit_and_reference()
    with pytest.raises(KeyError, match="missing"):
        unit.load_state_dict({"0.2.w1.weight": torch.zeros(8, 4).numpy()})
