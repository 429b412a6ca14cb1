"""The asynchronous dataflow engine between the controller and its ComputeUnit actors.

Every remote call is submitted at once and returns an ObjectRef; the engine waits only when a value is
needed (the combine needs expert outputs; autograd needs input gradients), and every wait has a deadline.
Calls whose results nobody needs (the experts' optimizer step) are fire-and-forget: Ray runs one
caller's calls to one actor in submission order, so the next forward on a unit runs after its step, and
the engine checks those calls for errors at its next wait. ``zero_grad`` sends nothing: it bumps a
gradient epoch that every later call carries, and a unit zeroes its gradients when it sees a new one.

Rows travel as numpy arrays through Ray's object store, except to units on the controller's own node:
those read a layer's rows from a shared-memory region the controller wrote once, and write their
outputs into another in place (``actors/shm.py``); the calls then carry only descriptors.

Shape legend: N = rows grouped by expert, D = model dim, E = experts of one layer
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from torch import nn

from zetta_ray.actors.compute_unit import ComputeUnitActor
from zetta_ray.actors.shm import SharedArena, SharedRows, portable
from zetta_ray.actors.wire import from_wire, to_wire
from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import ConfigError, DeadlineExceeded, UnitFailed, UnitFault

__all__ = ["Call", "ExpertRuntime", "Layout", "Ticket", "by_value"]


@dataclass(frozen=True, slots=True)
class Layout:
    """Which unit hosts each expert: ``unit_LE[layer][expert]``.

    ``Layout.blocks`` gives unit ``u`` experts ``[u * k, (u + 1) * k)`` of every layer; a placer may give
    any assignment (``Layout(n_units, unit_LE)``), e.g. more experts on faster units.
    """

    n_units: int
    unit_LE: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        for layer, units in enumerate(self.unit_LE):
            bad = [u for u in units if not 0 <= u < self.n_units]
            if bad:
                raise ConfigError(
                    f"layout of MoE layer {layer} names units {bad} outside 0..{self.n_units - 1}"
                )

    @classmethod
    def blocks(cls, n_units: int, experts_per_layer: tuple[int, ...]) -> Layout:
        for layer, n in enumerate(experts_per_layer):
            if n % n_units:
                raise ConfigError(
                    f"expert degree ({n_units}) must divide the number of experts ({n}) of MoE layer "
                    f"{layer}; choose a degree among the divisors of {n}"
                )
        return cls(n_units, tuple(tuple(e * n_units // n for e in range(n)) for n in experts_per_layer))

    def unit_of(self, layer: int, expert: int) -> int:
        return self.unit_LE[layer][expert]

    def experts_of(self, unit: int) -> list[tuple[int, int]]:
        return [(l, e) for l, units in enumerate(self.unit_LE) for e, u in enumerate(units) if u == unit]

    def experts_in_layer(self, unit: int, layer: int) -> list[int]:
        return [e for e, u in enumerate(self.unit_LE[layer]) if u == unit]


def _segments(offsets: list[int], experts: list[int]) -> list[tuple[int, int]]:
    """Row ranges of ``experts`` (ascending), adjacent ranges merged."""
    out: list[tuple[int, int]] = []
    for e in experts:
        lo, hi = offsets[e], offsets[e + 1]
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _take(t: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """The rows of ``segments`` (a view when there is one segment)."""
    if len(segments) == 1:
        return t[segments[0][0] : segments[0][1]]
    return torch.cat([t[lo:hi] for lo, hi in segments])


def _scatter(outs: list[Any], calls: list[Call], like: torch.Tensor, writable: bool = True) -> torch.Tensor:
    """Put each call's output rows back at its segments.

    Unless ``writable``: when one call carried every row in order, its output is returned as it came,
    read-only memory of the object store (expert outputs, which the MoE layer's combine and its backward
    only read; never gradients, into which autograd may accumulate in place)."""
    if not writable and len(calls) == 1 and calls[0].segments == [(0, like.shape[0])]:
        return from_wire(outs[0])
    out = torch.empty_like(like)  # every row belongs to exactly one call
    for o, c in zip(outs, calls, strict=True):
        rows, pos = from_wire(o), 0
        for lo, hi in c.segments:
            out[lo:hi] = rows[pos : pos + hi - lo]
            pos += hi - lo
    return out


def by_value(args: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
    """``args`` of a call for a replacement unit, carrying their rows themselves: rows in this node's
    shared memory copied out (``portable``), rows in the object store fetched here (this process put
    them, so they are local). Passing the first ObjectRef again would let Ray pull the rows from any
    node that received them, including a node that has died but is not yet declared dead, and such a
    pull waits for the cluster's verdict (about 15 s with Ray's default health checks)."""
    return tuple(ray.get(a, timeout=timeout_s) if isinstance(a, ray.ObjectRef) else a for a in portable(args))


@dataclass(slots=True)
class Call:
    """One remote call the runtime sent and may still wait for.

    The supervisor (``zetta_ray.control``) gets the calls of a failed wait: for a replaced unit it points
    ``ref`` at the replayed call's result (when ``logged``, the journal's record, was replayed) or asks
    the runtime to ``resend`` it. ``experts``, ``step`` and ``phase`` name the call in faults.
    """

    ref: ray.ObjectRef
    unit: int
    experts: list[tuple[int, int]]
    step: int
    phase: str
    segments: list[tuple[int, int]] = field(default_factory=list)  # row ranges this call carries
    method: str = ""
    args: tuple[Any, ...] = ()
    logged: Any = None  # the journal's record of this call, when it changes the unit's state


def _unanswered(calls: list[Call]) -> list[Call]:
    """The calls of ``calls`` whose result has not arrived, in their order."""
    _, waiting = ray.wait([c.ref for c in calls], num_returns=len(calls), timeout=0)
    waiting_refs = set(waiting)
    return [c for c in calls if c.ref in waiting_refs]


# Where each of these methods takes its rows; the engine sends them as (rows, the other arguments in one
# tuple) to ``ComputeUnit.<method>_call``, which saves Ray serializing each argument on its own.
_ROWS_AT = {"forward": 3, "backward": 1}

_PROBE_EVERY_S = 2.0  # while a wait lasts, how often the supervisor is asked for units on dead nodes

_JOURNALED = frozenset(
    {"forward", "backward", "step", "set_optimizer", "load_state_dict", "load_optimizer_state_dict"}
)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What backward needs to find a forward again: its key and which units ran which rows."""

    key: tuple[int, int, int]  # (step, layer, micro-batch)
    calls: list[Call] = field(default_factory=list)
    input_grad: bool = True  # False: backward returns no input gradients


class ExpertRuntime:
    """Drives the ComputeUnits of one distributed module.

    Two optional collaborators make it fault tolerant without the runtime knowing how (they live in
    ``zetta_ray.control``): a ``journal`` that records every call that changes a unit's state, in send
    order (``record(unit, method, step, args)``), and a ``supervisor`` that is told when a step ends
    (``after_step(runtime)``) and asked to repair a failed unit (``recover(runtime, fault, calls)``: it
    replaces ``runtime.units[u]`` and re-sends the unit's calls in ``calls``, or raises), and, every
    ``_PROBE_EVERY_S`` of a wait that lasts, which of the awaited units sit on a dead node
    (``lost_units(units)``): Ray fails a call to an actor whose node died only once the cluster
    declares the node dead, which its default health checks take about 15 s to do.
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
        self._micro_batch: dict[int, itertools.count] = {}
        self._pending: list[Call] = []
        self._grad_epoch = 0
        self._arena: SharedArena | None = None  # shared memory for units on this node
        self._node = ""
        self._local: dict[int, bool] = {}  # unit -> runs on this node (False until known)
        self._probes: dict[int, ray.ObjectRef] = {}  # unit -> its pending ping, which names its node

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
            num_cpus = cfg.unit_num_cpus
            if num_cpus is None:
                num_cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / n)
            unit_options = [{"num_cpus": num_cpus}] * n
        runtime = cls([], layout, cfg)
        runtime.skeletons = [
            {(l, e): copy.deepcopy(experts_by_layer[l][e]).to("meta") for l, e in layout.experts_of(u)}
            for u in range(n)
        ]
        runtime.unit_options = list(unit_options)
        if cfg.shared_memory:
            runtime._arena = SharedArena.create()
            runtime._node = ray.get_runtime_context().get_node_id()
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
        if self._arena is not None:  # until its ping says where it runs, it gets rows by object store
            self._local[u] = False
            self._probes[u] = unit.ping.remote()
        return unit

    # -- dataflow -----------------------------------------------------------------------------------

    def forward(
        self, layer: int, x_ND: torch.Tensor, counts_E: list[int], keep: bool, input_grad: bool = True
    ) -> tuple[torch.Tensor, Ticket]:
        """Send each unit its experts' rows at once; wait for all; return outputs in row order."""
        key = (self.step, layer, next(self._micro_batch.setdefault(layer, itertools.count())))
        offsets = [0, *itertools.accumulate(counts_E)]
        x = x_ND.detach()
        plan = [
            (u, [e for e in self.layout.experts_in_layer(u, layer) if counts_E[e] > 0])
            for u in range(len(self.units))
        ]
        plan = [
            (u, experts) for u, experts in plan if experts
        ]  # a unit none of whose experts got a token: no call
        shared_x, shared_y = self._shared_pair(x, [u for u, _ in plan], output=True)
        calls = []
        for u, experts in plan:
            segments = _segments(offsets, experts)
            if shared_x is not None and self._local[u]:
                rows, out = shared_x.take(segments), shared_y.take(segments, output=True)
            else:
                rows, out = self._rows(_take(x, segments), journaled=keep), None
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
        y = self._combine(self._gather(calls), calls, x, shared_y, writable=False)
        return y, Ticket(key, calls, input_grad)

    def backward(self, ticket: Ticket, dy_ND: torch.Tensor) -> torch.Tensor | None:
        step = ticket.key[0]
        if step != self.step:
            raise RuntimeError(
                f"backward of a forward from step {step} after the optimizer moved to step {self.step}: "
                "call loss.backward() before opt.step()"
            )
        dy = dy_ND.detach()
        shared_dy, shared_dx = self._shared_pair(dy, [c.unit for c in ticket.calls], output=ticket.input_grad)
        calls = []
        for c in ticket.calls:
            if shared_dy is not None and self._local[c.unit]:
                rows = shared_dy.take(c.segments)
                out = shared_dx.take(c.segments, output=True) if shared_dx is not None else None
            else:
                rows, out = self._rows(_take(dy, c.segments)), None
            args = (ticket.key, rows, self._grad_epoch, out)
            calls.append(self._submit(c.unit, "backward", args, "backward", c.experts, c.segments))
        outs = self._gather(calls)
        return self._combine(outs, calls, dy, shared_dx) if ticket.input_grad else None

    # -- optimizer ----------------------------------------------------------------------------------

    def set_optimizer(self, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        self._gather(self._each("set_optimizer", "control", optimizer_cls, kwargs))

    def zero_grad(self) -> None:
        self._grad_epoch += 1

    def step_experts(self) -> None:
        """Every unit steps its own parameters; nobody waits here (see the module docstring)."""
        self._pending += self._each("step", "optimizer", self.step, self._grad_epoch)
        self.step += 1
        self._micro_batch.clear()
        if self.supervisor is not None:
            self.supervisor.after_step(self)

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
        """Load unit ``u``'s ``snapshots[u]`` (a ``checkpoint.Snapshot`` from a durable checkpoint) into
        every unit and count on from ``step`` optimizer steps and ``grad_epoch`` zero_grads."""
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
        """The controller's node id when units on it share memory with it (``RuntimeConfig.shared_memory``),
        else None. Snapshot slots (``actors/staging.py``) exist only for units on this node."""
        return self._node if self._arena is not None else None

    @property
    def arena(self) -> SharedArena | None:
        """The shared-memory arena the controller writes rows into for units on its node, or None."""
        return self._arena

    def is_local(self, u: int) -> bool:
        """Whether unit ``u`` runs on the controller's node, as far as its ping has answered yet (never
        waits); such a unit receives its rows through shared memory."""
        return self._is_local(u)

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
        if self._arena is not None:
            self._arena.close()

    # -- shared memory (actors/shm.py) ----------------------------------------------------------------

    def _is_local(self, u: int) -> bool:
        """Whether unit ``u`` runs on this node, as far as its ping has answered yet (never waits)."""
        probe = self._probes.get(u)
        if probe is not None:
            ready, _ = ray.wait([probe], timeout=0)
            if ready:
                del self._probes[u]
                try:
                    self._local[u] = ray.get(probe, timeout=0)["node_id"] == self._node
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    self._local[u] = False  # dead already: the call itself will report it
        return self._local.get(u, False)

    def _shared_pair(
        self, t: torch.Tensor, units: list[int], output: bool
    ) -> tuple[SharedRows | None, SharedRows | None]:
        """``t`` copied into shared memory, and (with ``output``) an empty region like it for the
        results, when any of ``units`` runs on this node; else ``(None, None)``."""
        if self._arena is None or t.numel() * t.element_size() < self.cfg.shared_memory_min_bytes:
            return None, None
        if not [u for u in units if self._is_local(u)]:
            return None, None
        shared_in = self._arena.share(t)
        shared_out = self._arena.empty(tuple(t.shape), shared_in.dtype) if shared_in and output else None
        if shared_in is None or (output and shared_out is None):
            return None, None
        return shared_in, shared_out

    def _combine(
        self,
        outs: list[Any],
        calls: list[Call],
        like: torch.Tensor,
        shared: SharedRows | None,
        writable: bool = True,
    ) -> torch.Tensor:
        """The calls' output rows in row order. Units on this node wrote theirs into ``shared`` already;
        the rows that others returned are copied in."""
        if shared is None:
            return _scatter(outs, calls, like, writable)
        out = shared.tensor()
        for o, c in zip(outs, calls, strict=True):
            if isinstance(o, SharedRows):
                continue
            rows, pos = from_wire(o), 0
            for lo, hi in c.segments:
                out[lo:hi] = rows[pos : pos + hi - lo]
                pos += hi - lo
        return out

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
        """Wait for ``calls`` (and any fire-and-forget calls still pending) within the deadline.

        Raises ``DeadlineExceeded`` naming the first late call, or ``UnitFailed`` for a call whose actor
        died or raised.
        """
        deadline_s = self.cfg.deadline_s if deadline_s is None else deadline_s
        everything = self._pending + calls
        self._pending = []
        if not everything:
            return []
        while True:
            try:
                results = self._wait(everything, deadline_s)
                return results[len(everything) - len(calls) :]
            except UnitFault as fault:
                if self.supervisor is None:
                    raise
                self.supervisor.recover(self, fault, everything)  # replaces the unit, or raises

    def _wait(self, everything: list[Call], deadline_s: float) -> list[Any]:
        refs = [c.ref for c in everything]
        end = time.monotonic() + deadline_s
        probe = self.supervisor is not None
        try:
            while True:  # the fast path: one round trip to Ray's core worker
                left = end - time.monotonic()
                try:
                    return ray.get(refs, timeout=max(0.0, min(left, _PROBE_EVERY_S) if probe else left))
                except ray.exceptions.GetTimeoutError:
                    if not probe or time.monotonic() >= end:
                        raise
                    self._raise_if_node_lost(everything)
        except ray.exceptions.GetTimeoutError:
            c = _unanswered(everything)[0]
            raise DeadlineExceeded(
                unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, deadline_s=deadline_s
            ) from None
        except ray.exceptions.RayError:
            for c in everything:  # find the call that failed, to name it
                try:
                    ray.get(c.ref, timeout=deadline_s)
                except ray.exceptions.GetTimeoutError:
                    raise DeadlineExceeded(
                        unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, deadline_s=deadline_s
                    ) from None
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    raise UnitFailed(
                        unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, cause=cause
                    ) from e
            raise  # unreachable in practice: some call must have failed

    def _raise_if_node_lost(self, everything: list[Call]) -> None:
        """``UnitFailed`` for the first unanswered call of a unit whose node the supervisor finds dead."""
        pending = _unanswered(everything)
        lost = set(self.supervisor.lost_units(sorted({c.unit for c in pending})))
        for c in pending:
            if c.unit in lost:
                cause = RuntimeError(f"the node of unit {c.unit} is dead: its raylet refuses connections")
                raise UnitFailed(unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, cause=cause)
