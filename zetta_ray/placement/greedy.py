"""Experts onto units for a fixed set of dense units: a shortlist, a longest-processing-time greedy and
a local search, one MoE layer at a time.

Shape legend: X = all experts, U = units, S = shortlisted candidate units.

**Shortlist.** Given the dense units, an expert's cost on a unit depends only on the unit's kind, FLOP/s,
free memory, its links to the dense units (sum of 1/bandwidth and the worst latency), whether it hosts a
dense unit, and how far its nearest allowed snapshot pool is. Units equal in all of these are
interchangeable, and no plan uses more units than there are experts, so ``Layered`` keeps at most that
many units of each class (which ones: the seed). A 100k-unit machine shrinks to a few thousand
candidates and no plan is lost.

**Greedy.** Each layer's experts, heaviest first, go to the candidate that least raises
``layer time + snapshot time``, where layer time = max(slowest unit's compute + port time, dense port
time), the dense port time tracked as the mean over dense units; ties go to the unit that adds the least
work. Snapshot traffic up to a ``budget`` (in experts' worth per unit) counts as already paid; the caller
tries several budgets because that cost comes in steps (see ``placer``).

**Local search.** Moves and swaps of the bottleneck unit's experts (or of the farthest experts, when the
dense port is the bottleneck), applied while the objective drops; each step is O(S + E) numpy work.
"""

from __future__ import annotations

import numpy as np

from zetta_ray.placement.cost import ROUNDS_PER_LAYER, Workload
from zetta_ray.placement.plan import NoRoom, PlacerConfig
from zetta_ray.placement.topology import Tier, Topology

__all__ = ["Layered", "tier_counts"]

_TIE = 1e-9  # relative tolerance under which two predicted times count as equal


def tier_counts(
    t: Topology,
    peers: np.ndarray,
    units: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    pools: bool = False,
) -> np.ndarray:
    """``(len(units), 5)``: how many ``peers`` (or how much weight) each unit sees on each ``Tier``.

    ``peers`` are unit ids, or node ids of memory pools when ``pools`` (a pool is never at Tier.UNIT).
    Counting per node, rack and pod makes this O(units + peers), never units x peers.
    """
    w = np.ones(len(peers)) if weights is None else weights
    peer_node = peers if pools else t.unit_node_U[peers]
    at_node = np.bincount(peer_node, weights=w, minlength=t.n_nodes)[t.unit_node_U[units]]
    at_unit = np.zeros(len(units)) if pools else np.bincount(peers, weights=w, minlength=t.n_units)[units]
    peer_rack = t.node_rack_N[peer_node]
    at_rack = np.bincount(peer_rack, weights=w, minlength=t.n_racks)[t.unit_rack_U[units]]
    at_pod = np.bincount(t.rack_pod_R[peer_rack], weights=w, minlength=t.n_pods)[t.unit_pod_U[units]]
    total = np.full(len(units), w.sum())
    return np.stack([at_unit, at_node - at_unit, at_rack - at_node, at_pod - at_rack, total - at_pod], axis=1)


def _snapshot_seconds(t: Topology, w: Workload, units: np.ndarray) -> np.ndarray:
    """Per unit: port seconds per step that one hosted expert's replicas add, sent to the nearest pool
    the failure-domain rule allows (another node of the rack, else another rack of the pod, else the
    fabric; never the own rack when the pools span more than one rack)."""
    if w.replicas == 0:
        return np.zeros(len(units))
    at = tier_counts(t, t.pool_node_P, units, None, pools=True)
    rack_rule = len(np.unique(t.pool_rack_P)) > 1
    tier = np.where(at[:, Tier.POD] > 0, Tier.POD, Tier.FABRIC)
    if not rack_rule:
        tier = np.where(at[:, Tier.RACK] > 0, Tier.RACK, tier)
    return w.replicas * w.snapshot_bytes / w.snapshot_every / t.links.bandwidth_T[tier]


def _max_without(values: np.ndarray, top: list[int], h: int, others: np.ndarray) -> np.ndarray:
    """For each index in ``others``: the max of ``values`` leaving out ``h`` and that index.
    ``top`` holds the indices of the three largest values, largest first."""
    rest = [i for i in top if i != h][:2]
    a1 = float(values[rest[0]]) if rest else 0.0
    a2 = float(values[rest[1]]) if len(rest) > 1 else 0.0
    return np.where(others == (rest[0] if rest else -1), a2, a1)


def _top3(values: np.ndarray) -> list[int]:
    k = min(3, len(values))
    part = np.argpartition(-values, k - 1)[:k]
    return [int(i) for i in part[np.argsort(-values[part], kind="stable")]]


class Layered:
    """Greedy + local search over a shortlist, one MoE layer at a time. Build once per dense set (the
    shortlist is the costly part), then ``run`` with as many budgets as wanted.

    State (arrays over the shortlist S): ``T`` expert compute + port seconds of the current layer,
    ``count`` experts of the current layer, ``snap`` snapshot port seconds over all layers, ``free``
    memory. The objective of a layer is its time plus the snapshot time: ``phase + max(snap)``.
    """

    def __init__(
        self,
        t: Topology,
        w: Workload,
        cfg: PlacerConfig,
        units: np.ndarray,
        dense_D: np.ndarray,
        free_U: np.ndarray,
        rank_U: np.ndarray,
    ) -> None:
        counts = tier_counts(t, dense_D, units)
        inv_bw = counts @ (1.0 / t.links.bandwidth_T)
        lat = ((counts > 0) * t.links.latency_T).max(axis=1)
        hosts_dense = counts[:, Tier.UNIT] > 0
        snap = _snapshot_seconds(t, w, units)
        kind, flops, free = t.unit_kind_U[units], t.unit_flops_U[units], free_U[units]
        short = _shortlist(units, rank_U, w.total_experts, kind, flops, free, inv_bw, lat, hosts_dense, snap)
        self.w, self.units = w, units[short]
        self.inv_peak = 1.0 / t.unit_flops_U[self.units]
        self.inv_bw, self.lat4 = inv_bw[short], ROUNDS_PER_LAYER * lat[short]
        self.dense_host = hosts_dense[short].astype(np.float64)
        self.snap_add = snap[short]
        self.free_S = free_U[self.units]
        self.moves = cfg.max_moves if cfg.max_moves is not None else 2 * w.n_experts
        self.flops, self.bytes, self.mem = w.flops_X, w.edge_bytes_X, w.memory_X

    def run(self, budget: float = 0.0) -> np.ndarray:
        """Unit of every expert, shape (X,). ``budget``: snapshot traffic per unit, in experts' worth,
        that counts as already paid (0: every byte counts; ``inf``: snapshots are ignored).
        Raises ``NoRoom`` when an expert finds no unit with memory left."""
        worst = float(self.snap_add.max(initial=0.0))
        self.budget = budget * worst if budget > 0 and worst > 0 else 0.0
        self.snap, self.free = np.zeros(len(self.units)), self.free_S.copy()
        host_X = np.full(self.w.total_experts, -1, dtype=np.int64)
        for layer in range(self.w.n_layers):
            xs = np.arange(layer * self.w.n_experts, (layer + 1) * self.w.n_experts)
            xs = xs[np.lexsort((xs, -self.bytes[xs], -self.flops[xs]))]
            self._greedy(xs, host_X)
            self._search(xs, host_X)
        return self.units[host_X]

    def _greedy(self, xs: np.ndarray, host_X: np.ndarray) -> None:
        n_d = self.w.n_dense
        self.T, self.count = np.zeros(len(self.units)), np.zeros(len(self.units), dtype=np.int64)
        self.dense_bytes, self.dense_lat, cur = 0.0, 0.0, 0.0
        for x in xs:
            link = self.bytes[x] * self.inv_bw
            dense_new = self.dense_bytes + link / n_d
            dense_time = dense_new + np.maximum(self.dense_lat, self.lat4)
            add = self.flops[x] * self.inv_peak + link + np.where(self.count > 0, 0.0, self.lat4)
            phase = np.maximum(np.maximum(self.T + add + self.dense_host * dense_time, dense_time), cur)
            snap_max = float(self.snap.max(initial=0.0))
            delta = (
                phase
                - cur
                + self._over(np.maximum(self.snap + self.snap_add, snap_max))
                - self._over(snap_max)
            )
            delta[self.free < self.mem[x]] = np.inf
            best = delta.min()
            if best == np.inf:
                raise NoRoom(int(x))
            tie = delta <= best + _TIE * (cur + snap_max)
            pick = int(np.argmin(np.where(tie, add + link / n_d + self.snap_add, np.inf)))
            self.T[pick] += add[pick]
            self.count[pick] += 1
            self.snap[pick] += self.snap_add[pick]
            self.free[pick] -= self.mem[x]
            self.dense_bytes = float(dense_new[pick])
            self.dense_lat = max(self.dense_lat, float(self.lat4[pick]))
            host_X[x] = pick
            cur = max(cur, float(self.T[pick] + self.dense_host[pick] * (self.dense_bytes + self.dense_lat)))

    def _over(self, snap: np.ndarray | float) -> np.ndarray | float:
        """The snapshot time that counts: what exceeds the budget (nothing, with an infinite one)."""
        return np.maximum(np.subtract(snap, self.budget), 0.0)

    def _cost(self, xs: np.ndarray | int, s: np.ndarray | int) -> np.ndarray:
        return self.flops[xs] * self.inv_peak[s] + self.bytes[xs] * self.inv_bw[s]

    def _search(self, xs: np.ndarray, host_X: np.ndarray) -> None:
        """Apply the best improving move or swap, up to ``moves`` times (each step is O(S + E))."""
        n_d, S = self.w.n_dense, np.arange(len(self.units))
        for _ in range(self.moves):
            dense_time = self.dense_bytes + self.dense_lat
            T_eff = self.T + self.dense_host * dense_time
            snap_max = float(self.snap.max(initial=0.0))
            best, action = (max(float(T_eff.max()), dense_time) + self._over(snap_max)) * (1 - _TIE), None
            if dense_time >= T_eff.max():
                movers = xs[np.argsort(-self.bytes[xs] * self.inv_bw[host_X[xs]], kind="stable")[:8]]
            else:
                mine = xs[host_X[xs] == int(np.argmax(T_eff))]
                movers = mine[np.argsort(-self._cost(mine, host_X[mine]), kind="stable")[:8]]
            top_T, top_snap = _top3(T_eff), _top3(self.snap)
            for x in movers:
                h = int(host_X[x])
                T_h = self.T[h] - self._cost(x, h) - (self.lat4[h] if self.count[h] == 1 else 0.0)
                # Move x from h to every candidate s.
                d_time = (
                    self.dense_bytes + self.bytes[x] * (self.inv_bw - self.inv_bw[h]) / n_d + self.dense_lat
                )
                add = self._cost(x, S) + np.where(self.count > 0, 0.0, self.lat4)
                snap_new = np.maximum.reduce(
                    [
                        _max_without(self.snap, top_snap, h, S),
                        self.snap[h] - self.snap_add[h] + 0 * S,
                        self.snap + self.snap_add,
                    ]
                )
                new = self._over(snap_new) + np.maximum.reduce(
                    [
                        _max_without(T_eff, top_T, h, S),
                        T_h + self.dense_host[h] * d_time,
                        self.T + add + self.dense_host * d_time,
                        d_time,
                    ]
                )
                new[h] = np.inf
                new[self.free < self.mem[x]] = np.inf
                s = int(np.argmin(new))
                if new[s] < best:
                    best, action = float(new[s]), ("move", x, s, float(add[s]), float(d_time[s]))
                # Swap x with every expert y of the layer on another unit v (snapshot load unchanged).
                ys = xs[host_X[xs] != h]
                if not len(ys):
                    continue
                v = host_X[ys]
                T_hs = T_h + (self.lat4[h] if self.count[h] == 1 else 0.0) + self._cost(ys, h)
                T_vs = self.T[v] - self._cost(ys, v) + self._cost(x, v)
                d_s = (
                    self.dense_bytes
                    + (self.bytes[x] - self.bytes[ys]) * (self.inv_bw[v] - self.inv_bw[h]) / n_d
                )
                d_s = d_s + self.dense_lat
                new_s = self._over(snap_max) + np.maximum.reduce(
                    [
                        _max_without(T_eff, top_T, h, v),
                        T_hs + self.dense_host[h] * d_s,
                        T_vs + self.dense_host[v] * d_s,
                        d_s,
                    ]
                )
                fits = (self.free[v] + self.mem[ys] >= self.mem[x]) & (
                    self.free[h] + self.mem[x] >= self.mem[ys]
                )
                new_s[~fits] = np.inf
                i = int(np.argmin(new_s))
                if new_s[i] < best:
                    best, action = (
                        float(new_s[i]),
                        ("swap", x, int(ys[i]), float(T_hs[i]), float(T_vs[i]), float(d_s[i])),
                    )
            if action is None:
                return
            self._apply(action, host_X)

    def _apply(self, action: tuple, host_X: np.ndarray) -> None:
        if action[0] == "move":
            _, x, s, add, d_time = action
            h = int(host_X[x])
            self.T[h] -= self._cost(x, h) + (self.lat4[h] if self.count[h] == 1 else 0.0)
            self.T[s] += add
            self.count[h] -= 1
            self.count[s] += 1
            self.snap[h] -= self.snap_add[h]
            self.snap[s] += self.snap_add[s]
            self.free[h] += self.mem[x]
            self.free[s] -= self.mem[x]
            host_X[x] = s
            self.dense_bytes = d_time - self.dense_lat
            self.dense_lat = float(self.lat4[self.count > 0].max(initial=0.0))
        else:
            _, x, y, T_h, T_v, d_time = action
            h, v = int(host_X[x]), int(host_X[y])
            self.T[h], self.T[v] = T_h, T_v
            self.free[h] += self.mem[x] - self.mem[y]
            self.free[v] += self.mem[y] - self.mem[x]
            host_X[x], host_X[y] = v, h
            self.dense_bytes = d_time - self.dense_lat


def _shortlist(units, rank_U, keep, *keys) -> np.ndarray:
    """Positions into ``units``: at most ``keep`` per class of equal ``keys``, lowest seed rank first,
    returned in seed-rank order (so ``argmin`` ties fall on the seed's choice)."""
    if not len(units):
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((rank_U[units], *reversed(keys)))
    sorted_keys = np.stack([np.asarray(k, dtype=np.float64)[order] for k in keys], axis=1)
    start = np.r_[True, np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)]
    first = np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
    kept = order[np.arange(len(order)) - first < keep]
    return kept[np.argsort(rank_U[units[kept]], kind="stable")]
