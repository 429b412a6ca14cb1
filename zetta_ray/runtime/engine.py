"""The asynchronous dataflow engine between the controller and its ComputeUnit actors.

Every remote call is submitted at once and returns an ObjectRef; the engine waits only when a value is
needed (the combine needs expert outputs; autograd needs input gradients), and every wait has a deadline
(``calls.wait_for``). Calls whose results nobody needs (the experts' optimizer step) are fire-and-forget:
Ray runs one caller's calls to one actor in submission order, so the next forward on a unit runs after
its step, and the engine checks those calls for errors at its next wait. ``zero_grad`` sends nothing:
it bumps a gradient epoch that every later call carries, and a unit zeroes its gradients when it sees a
new one.

Rows travel as numpy arrays through Ray's object store, except to units on the controller's own node:
those read a layer's rows from a shared-memory region the controller wrote once, and write their
outputs into another in place (``transport.RowTransport``, ``actors/shm.py``); the calls then carry
only descriptors.

Touches Ray: starts the unit actors, sends every call, kills the actors at ``close``. ``Call``,
``Ticket``, ``by_value`` (``calls``) and ``Layout`` (``layout``) are importable from here too.
Shape legend: N = rows grouped by expert, D = model dim, E = experts of one layer
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import ray
import torch
from torch import nn

from zetta_ray.actors.compute_unit import ComputeUnitActor
from zetta_ray.actors.shm import SharedArena
from zetta_ray.actors.wire import to_wire
from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import UnitFault
from zetta_ray.runtime.calls import Call, Ticket, by_value, wait_for
from zetta_ray.runtime.layout import Layout
from zetta_ray.runtime.transport import RowTransport, row_segments, take_rows

__all__ = ["Call", "ExpertRuntime", "Layout", "Ticket", "by_value"]

# Where each of these methods takes its rows; the engine sends them as (rows, the other arguments in one
# tuple) to ``ComputeUnit.<method>_call``, which saves Ray serializing each argument on its own.
_ROWS_AT = {"forward": 3, "backward": 1}

_JOURNALED = frozenset(
    {"forward", "backward", "step", "set_optimizer", "load_state_dict", "load_optimizer_state_dict"}
)


class ExpertRuntime:
    """Drives the ComputeUnits of one distributed module.

    Two optional collaborators make it fault tolerant without the runtime knowing how (they live in
    ``zetta_ray.control``): a ``journal`` that records every call that changes a unit's state, in send
    order (``record(unit, method, step, args)``), and a ``supervisor`` that is told when a step ends
    (``after_step(runtime)``) and asked to repair a failed unit (``recover(runtime, fault, calls)``: it
    replaces ``runtime.units[u]`` and re-sends the unit's calls in ``calls``, or raises), and, every
    ``calls.PROBE_EVERY_S`` of a wait that lasts, which of the awaited units sit on a dead node
    (``lost_units(units)``; see ``calls.wait_for``).
    """

    def __init__(self, units: list[Any], layout: Layout, cfg: RuntimeConfig):
        self.units = units
        self.layout = layout
        self.cfg = cfg
        self.step = 0
        self.skeletons: list[dict[tuple[int, int], nn.Module]] = []  # what each unit was built with
        self.unit_options: list[dict[str, Any]] = []
        self.journal: Any = None
        self.supervisor: Any = None
        self.source: tuple[int, int] | None = None  # a replica's (rank, incarnation), in its save keys
        self._micro_batch: dict[int, itertools.count] = {}
        self._pending: list[Call] = []
        self._grad_epoch = 0
        self._transport = RowTransport(cfg.shared_memory_min_bytes)  # shared memory or object store

    @classmethod
    def launch(
        cls,
        experts_by_layer: list[list[nn.Module]],
        layout: Layout,
        cfg: RuntimeConfig,
        unit_options: list[dict[str, Any]] | None = None,
    ) -> ExpertRuntime:
        """Start ``layout.n_units`` units, hand each its experts' structure, then their weights as numpy.

        ``unit_options[u]`` are extra Ray actor options for unit ``u`` (resources, a placement-group
        scheduling strategy); by default the cluster's CPUs are shared evenly, at most one per unit.
        """
        n = layout.n_units
        if unit_options is None:
            unit_options = _default_options(cfg, n)
        runtime = cls([], layout, cfg)
        runtime.skeletons = [
            {(l, e): copy.deepcopy(experts_by_layer[l][e]).to("meta") for l, e in layout.experts_of(u)}
            for u in range(n)
        ]
        runtime.unit_options = list(unit_options)
        if cfg.shared_memory:
            runtime._transport.open()
        runtime.units = [runtime.start_unit(u) for u in range(n)]
        try:
            runtime.load_state_dict(
                {
                    f"{l}.{e}.{name}": to_wire(t)
                    for l, experts in enumerate(experts_by_layer)
                    for e, expert in enumerate(experts)
                    for name, t in expert.state_dict().items()
                },
                deadline_s=cfg.start_deadline_s,
            )
        except BaseException:
            runtime.close()
            raise
        return runtime

    def start_unit(self, u: int, **overrides: Any) -> Any:
        """A new actor for unit ``u``, built as the original was (``overrides`` change where)."""
        options = {**self.unit_options[u], **overrides}
        unit = ComputeUnitActor.options(**options).remote(u, self.skeletons[u], self.cfg.threads_per_unit)
        self._transport.watch(u, unit)  # until its ping says where it runs, rows go by object store
        return unit

    # -- dataflow -----------------------------------------------------------------------------------

    def forward(
        self, layer: int, x_ND: torch.Tensor, counts_E: list[int], keep: bool, input_grad: bool = True
    ) -> tuple[torch.Tensor, Ticket]:
        """Send each unit its experts' rows at once; wait for all; return outputs in row order."""
        key = (
            self.step,
            layer,
            next(self._micro_batch.setdefault(layer, itertools.count())),
            *(self.source or ()),
        )
        offsets = [0, *itertools.accumulate(counts_E)]
        x = x_ND.detach()
        plan = [
            (u, [e for e in self.layout.experts_in_layer(u, layer) if counts_E[e] > 0])
            for u in range(len(self.units))
        ]
        plan = [
            (u, experts) for u, experts in plan if experts
        ]  # a unit none of whose experts got a token: no call
        shared = self._transport.share(x, [u for u, _ in plan], output=True)
        calls = []
        for u, experts in plan:
            segments = row_segments(offsets, experts)
            if shared is not None and u in shared.local:
                rows, out = shared.rows.take(segments), shared.out.take(segments, output=True)
            else:
                rows, out = self._rows(take_rows(x, segments), journaled=keep), None
            args = (
                key,
                experts,
                [counts_E[e] for e in experts],
                rows,
                keep,
                self._grad_epoch,
                input_grad,
                out,
            )
            calls.append(
                self._submit(
                    u, "forward", args, "forward", [(layer, e) for e in experts], segments, journaled=keep
                )
            )
        y = self._transport.combine(self._gather(calls), calls, x, shared, writable=False)
        return y, Ticket(key, calls, input_grad)

    def backward(self, ticket: Ticket, dy_ND: torch.Tensor) -> torch.Tensor | None:
        step = ticket.key[0]
        if step != self.step:
            raise RuntimeError(
                f"backward of a forward from step {step} after the optimizer moved to step {self.step}: "
                "call loss.backward() before opt.step()"
            )
        dy = dy_ND.detach()
        shared = self._transport.share(dy, [c.unit for c in ticket.calls], output=ticket.input_grad)
        calls = []
        for c in ticket.calls:
            if shared is not None and c.unit in shared.local:
                rows = shared.rows.take(c.segments)
                out = shared.out.take(c.segments, output=True) if shared.out is not None else None
            else:
                rows, out = self._rows(take_rows(dy, c.segments)), None
            args = (ticket.key, rows, self._grad_epoch, out)
            calls.append(self._submit(c.unit, "backward", args, "backward", c.experts, c.segments))
        outs = self._gather(calls)
        return self._transport.combine(outs, calls, dy, shared) if ticket.input_grad else None

    # -- optimizer ----------------------------------------------------------------------------------

    def set_optimizer(self, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        self._gather(self._each("set_optimizer", "control", optimizer_cls, kwargs))

    def zero_grad(self) -> None:
        self._grad_epoch += 1

    def step_experts(self, replicas: int = 0) -> list[Call]:
        """Every unit steps its own parameters; nobody waits here (see the module docstring). With
        ``replicas``: on the mean of their gradients, and the caller waits for the calls returned."""
        calls = self._each("step", "optimizer", self.step, self._grad_epoch, replicas)
        self._pending += [] if replicas else calls
        self.step += 1
        self._micro_batch.clear()
        if self.supervisor is not None:
            self.supervisor.after_step(self)
        return calls

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"{layer}.{expert}.{name}": ndarray}`` over all units."""
        merged: dict[str, Any] = {}
        for part in self._gather(self._each("state_dict", "control")):
            merged.update(part)
        return merged

    def load_state_dict(self, state: dict[str, Any], deadline_s: float | None = None) -> None:
        per_unit: list[dict[str, Any]] = [{} for _ in self.units]
        for name, value in state.items():
            layer, expert, _ = name.split(".", 2)
            per_unit[self.layout.unit_of(int(layer), int(expert))][name] = value
        calls = [
            self._submit(u, "load_state_dict", (part,), "control", self.layout.experts_of(u))
            for u, part in enumerate(per_unit)
        ]
        self._gather(calls, deadline_s)

    def optimizer_state_dict(self) -> list[dict[str, Any]]:
        return self._gather(self._each("optimizer_state_dict", "control"))

    def load_optimizer_state_dict(self, states: list[dict[str, Any]]) -> None:
        self._load_each("load_optimizer_state_dict", states, "optimizer state has")

    def restore(self, snapshots: list[Any], step: int, grad_epoch: int) -> None:
        """Load ``snapshots[u]`` (from a durable checkpoint) into unit ``u``; count on from ``step`` and
        ``grad_epoch``."""
        self._load_each("restore", snapshots, "the checkpoint holds")
        self.step, self._grad_epoch = step, grad_epoch
        self._micro_batch.clear()

    def _load_each(self, method: str, per_unit: list[Any], what: str) -> None:
        """Call ``method(per_unit[u])`` on every unit ``u`` and wait."""
        if len(per_unit) != len(self.units):
            raise ValueError(
                f"{what} {len(per_unit)} unit entries but this module runs {len(self.units)} units; load "
                "it into a module parallelized with the same expert degree"
            )
        calls = [
            self._submit(u, method, (item,), "control", self.layout.experts_of(u))
            for u, item in enumerate(per_unit)
        ]
        self._gather(calls)

    @property
    def node(self) -> str | None:
        """The controller's node when units on it share its memory, else None (snapshot slots too)."""
        return self._transport.node

    @property
    def arena(self) -> SharedArena | None:
        """The shared-memory arena the controller writes rows into for units on its node, or None."""
        return self._transport.arena

    def is_local(self, u: int) -> bool:
        """Whether unit ``u`` runs on this node (rows by shared memory), as its ping said; never waits."""
        return self._transport.is_local(u)

    def treat_as_remote(self, units: list[int]) -> None:
        """Send ``units`` rows by object store as if remote, until replaced (a testing hook)."""
        self._transport.treat_as_remote(units)

    @property
    def grad_epoch(self) -> int:
        """How many ``zero_grad`` the controller has issued (units zero their gradients lazily)."""
        return self._grad_epoch

    def ping(self) -> list[dict[str, Any]]:
        return self._gather(self._each("ping", "control"))

    def close(self) -> None:
        for unit in self.units:
            ray.kill(unit, no_restart=True)
        self.units = []
        self._pending = []
        self._transport.close()

    # -- waiting --------------------------------------------------------------------------------------

    def _each(self, method: str, phase: str, *args: Any) -> list[Call]:
        return [
            self._submit(u, method, args, phase, self.layout.experts_of(u)) for u in range(len(self.units))
        ]

    def _rows(self, t: torch.Tensor, journaled: bool = True) -> Any:
        """Rows for the wire. When the call is journaled they go into the object store first, so the
        journal holds a reference (replay needs them; Ray frees an object with its last reference) at no
        extra copy."""
        return ray.put(to_wire(t)) if journaled and self.journal is not None else to_wire(t)

    def _submit(
        self,
        u: int,
        method: str,
        args: tuple[Any, ...],
        phase: str,
        experts: list[tuple[int, int]],
        segments: list[tuple[int, int]] | None = None,
        journaled: bool = True,
    ) -> Call:
        """Send one call; journal it first when it changes the unit's state (``journaled=False``: a
        forward that keeps nothing, e.g. evaluation under ``torch.no_grad()``)."""
        logged = None
        if journaled and self.journal is not None and method in _JOURNALED:
            logged = self.journal.record(u, method, self.step, args)
        ref = self._send(u, method, args)
        return Call(ref, u, experts, self.step, phase, segments or [], method, args, logged)

    def resend(self, call: Call) -> None:
        """Send ``call`` again to its unit's current actor (after a replacement)."""
        call.ref = self._send(call.unit, call.method, by_value(call.args, self.cfg.deadline_s))

    def _send(self, u: int, method: str, args: tuple[Any, ...]) -> ray.ObjectRef:
        """``units[u].<method>(*args)``, forward and backward as rows plus one tuple (see ``_ROWS_AT``)."""
        unit = self.units[u]
        at = _ROWS_AT.get(method)
        if at is None:
            return getattr(unit, method).remote(*args)
        return getattr(unit, f"{method}_call").remote(args[at], args[:at] + args[at + 1 :])

    def _gather(self, calls: list[Call], deadline_s: float | None = None) -> list[Any]:
        """Wait for ``calls`` (and any fire-and-forget calls still pending) within the deadline; a late
        call is ``DeadlineExceeded``, a dead or raising actor ``UnitFailed`` (the supervisor repairs)."""
        deadline_s = self.cfg.deadline_s if deadline_s is None else deadline_s
        everything = self._pending + calls
        self._pending = []
        if not everything:
            return []
        while True:
            try:
                lost = self.supervisor.lost_units if self.supervisor is not None else None
                results = wait_for(everything, deadline_s, lost)
                return results[len(everything) - len(calls) :]
            except UnitFault as fault:
                if self.supervisor is None:
                    raise
                self.supervisor.recover(self, fault, everything)  # replaces the unit, or raises


def _default_options(cfg: RuntimeConfig, n: int) -> list[dict[str, Any]]:
    """Ray actor options of ``n`` units: ``cfg.unit_num_cpus`` each, or the cluster's CPUs shared evenly
    (at most one per unit)."""
    num_cpus = cfg.unit_num_cpus
    if num_cpus is None:
        num_cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / n)
    return [{"num_cpus": num_cpus}] * n
