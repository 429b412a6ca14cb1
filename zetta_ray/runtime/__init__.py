"""The asynchronous dataflow runtime: the controller's side of every call to a compute unit.

- ``engine.py``: ``ExpertRuntime`` starts the ComputeUnit actors, sends each unit its experts' rows
  (forward, backward, optimizer step, state) as Ray calls that return ObjectRefs, and kills the actors
  at ``close``. Touches Ray.
- ``calls.py``: ``Call``, ``Ticket``, and ``wait_for``, the one place the engine blocks (``ray.get`` with
  a deadline; a Ray error or a timeout becomes a named ``UnitFailed`` / ``DeadlineExceeded``). Touches
  Ray.
- ``transport.py``: ``RowTransport``, shared memory for units on the controller's node and the object
  store for the rest; reads each new unit's ping to learn its node. Touches Ray.
- ``layout.py``: ``Layout``, which unit hosts which expert. Pure.
- ``bridge.py``: ``RemoteExperts``, the autograd Function that makes ``loss.backward()`` drive the units'
  backward; it calls the engine and never Ray itself.

Fault tolerance is not here: the engine takes a journal and a supervisor (``zetta_ray.control``) and
calls them without knowing how they work.
"""

from zetta_ray.runtime.bridge import RemoteExperts
from zetta_ray.runtime.calls import Call, Ticket
from zetta_ray.runtime.engine import ExpertRuntime
from zetta_ray.runtime.layout import Layout
from zetta_ray.runtime.transport import RowTransport

__all__ = ["Call", "ExpertRuntime", "Layout", "RemoteExperts", "RowTransport", "Ticket"]
