"""What every placement algorithm shares: the result type, load statistics, and the quality measures.

Conventions (one definition, used by every command that prints a number):

- ``load`` [L, E]: token-choices per logical expert per MoE layer (a trace window's counts, a load file).
- ``num_slots``: physical slots per layer over the whole cluster (DeepSeek EPLB's ``num_replicas``);
  ``num_slots // num_gpus`` per GPU.
- A redundant expert's tokens split evenly over its replicas (vLLM's EPLB sends a token's choice to
  replica ``position % replica_count``), so each replica carries ``load[e] / logcnt[e]``.
- **balancedness** = Σ_layers mean_GPU(load) / Σ_layers max_GPU(load), in (0, 1], 1 = perfect. This is the
  figure vLLM's EPLB logs (``avg_tokens / max_tokens`` with both summed over layers; vllm/distributed/eplb/
  eplb_state.py). We follow it because it weights each layer by its size: with layers run one after the
  other and expert time ∝ tokens, it is exactly ideal MoE time ÷ actual MoE time.
- **imbalance** = mean over layers of max_GPU / mean_GPU (≥ 1): the per-layer figure DeepSeek and the papers
  quote ("busiest GPU is 1.08× the mean"). Reported beside balancedness, never instead of it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.io import check_file, parse_json
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec


class PlacementError(MoesimError):
    """An impossible placement request or a malformed load statistic."""


@dataclass
class PlacementResult:
    """A mapping plus how it was obtained: ``seconds`` of algorithm time and ``info`` (gap, bound, ...).

    ``log2phy`` [L, E, max count] (−1 padded): each expert's slots in *replica-rank* order — for ``eplb`` the
    order DeepSeek's reference returns (rank = the order replicate_experts created the replicas, eplb.py
    ``log2phy.scatter_(-1, phy2log * maxlogcnt + phyrank, ...)``), so a consumer that picks replica i by
    position gets the reference's slot; for the other algorithms replicas are ranked in slot order
    (``ExpertMapping.log2phy``).
    """

    mapping: ExpertMapping
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    log2phy: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.log2phy is None:
            self.log2phy = self.mapping.log2phy


# -- checks -------------------------------------------------------------------------------------------
def check_load(load: Any, what: str = "load") -> np.ndarray:
    """Return ``load`` as float64 [L, E]; raise a one-line error on a wrong shape, NaN/inf or negatives."""
    try:
        arr = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlacementError(f"{what} must be a numeric [layers × experts] table") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise PlacementError(f"{what} must be a non-empty [layers × experts] table, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        layer, expert = np.argwhere(~np.isfinite(arr))[0]
        raise PlacementError(f"{what} has a non-finite value at layer {layer}, expert {expert}")
    if np.any(arr < 0):
        layer, expert = np.argwhere(arr < 0)[0]
        raise PlacementError(f"{what} has a negative value {arr[layer, expert]:g} at layer {layer}, expert {expert}")
    if np.any(arr > MAX_LOAD):  # sums of such counts lose integer precision and predict absurd step times
        layer, expert = np.argwhere(arr > MAX_LOAD)[0]
        raise PlacementError(f"{what} has the value {arr[layer, expert]:g} at layer {layer}, expert {expert}; "
                             f"token counts above {MAX_LOAD:g} are refused")
    return arr


MAX_LOAD = float(1 << 40)


def check_shape(num_experts: int, num_gpus: int, num_slots: int, gpus_per_node: int = 1) -> int:
    """Validate the cluster shape; return slots per GPU."""
    for name, value in (("num_gpus", num_gpus), ("num_slots", num_slots), ("gpus_per_node", gpus_per_node)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise PlacementError(f"{name} must be a positive integer, got {value!r}")
    if num_slots % num_gpus:
        raise PlacementError(f"{num_slots} slots do not divide evenly over {num_gpus} GPUs")
    if num_slots < num_experts:
        raise PlacementError(f"{num_slots} slots cannot hold {num_experts} experts (need at least one slot each)")
    return num_slots // num_gpus


# -- per-GPU load and the quality measures ------------------------------------------------------------
def slot_loads(load: np.ndarray, mapping: ExpertMapping) -> np.ndarray:
    """[L, slots]: expected token-choices per physical slot, replicas sharing their expert's load evenly."""
    load = np.asarray(load, dtype=np.float64)
    _check_fit(load, mapping)
    per_replica = load / np.maximum(mapping.logcnt, 1)
    return np.take_along_axis(per_replica, mapping.phy2log, axis=1)


def gpu_loads(load: np.ndarray, mapping: ExpertMapping, policy: Any = None) -> np.ndarray:
    """[L, G] expected token-choices per GPU.

    ``policy`` None or one whose tables every origin shares (``vllm``, ``position``): replicas share evenly.
    A ``local`` ReplicaPolicy: tokens are assumed to originate evenly on all GPUs and go to the replicas that
    policy makes eligible from their origin.
    """
    load = np.asarray(load, dtype=np.float64)
    _check_fit(load, mapping)
    G, S = mapping.num_gpus, mapping.slots_per_gpu
    if policy is None or getattr(policy, "shared", True):
        return slot_loads(load, mapping).reshape(load.shape[0], G, S).sum(axis=2)
    out = np.zeros((mapping.num_layers, G))
    slot_gpu = mapping.slot_gpu()
    for layer in range(mapping.num_layers):
        table, count = policy.tables(mapping, layer)  # [G, E, R], [G, E]
        R = table.shape[2]
        eligible = np.arange(R)[None, None, :] < count[:, :, None]  # [G, E, R]
        share = np.where(eligible, load[layer][None, :, None] / (G * count[:, :, None]), 0.0)
        dest = slot_gpu[np.maximum(table, 0)]
        np.add.at(out[layer], dest[eligible], share[eligible])
    return out


def balancedness(load: np.ndarray, mapping: ExpertMapping, policy: Any = None) -> float:
    """Σ_l mean_g / Σ_l max_g of per-GPU load (vLLM EPLB's logged figure; see the module docstring)."""
    gl = gpu_loads(load, mapping, policy)
    top = float(gl.max(axis=1).sum())
    return 1.0 if top == 0 else float(gl.mean(axis=1).sum()) / top


def imbalance(load: np.ndarray, mapping: ExpertMapping, policy: Any = None) -> float:
    """Mean over layers (with any load) of busiest GPU ÷ mean GPU load (≥ 1)."""
    gl = gpu_loads(load, mapping, policy)
    mean = gl.mean(axis=1)
    busy = mean > 0
    return 1.0 if not busy.any() else float(np.mean(gl.max(axis=1)[busy] / mean[busy]))


def lower_bound(load: np.ndarray, num_gpus: int, num_slots: int) -> np.ndarray:
    """[L] a lower bound on the busiest GPU's load of any placement with ``num_slots`` slots per layer.

    The bound is the optimum of a relaxation that keeps replica counts integer but lets an expert's load
    spread over the GPUs that hold it in any proportion and drops the per-GPU slot limit (keeping the total):
    the smallest T with T ≥ Σ load / G and Σ_e max(1, ceil(load_e / T)) ≤ num_slots. Why it is a bound: if a
    placement's busiest GPU carries T*, expert e sits on d_e ≥ 1 distinct GPUs with Σ d_e ≤ num_slots, and
    some GPU takes ≥ load_e / d_e of it, so d_e ≥ load_e / T*; the mean bound is averaging. It dominates the
    trivial max(mean, max_e load_e / min(G, slots − E + 1)) and the LP relaxation of the MILP in milp.py.
    It is at least max_e load_e / G: an expert sits on at most G distinct GPUs (the replica cap).
    """
    load = check_load(load)
    E = load.shape[1]
    check_shape(E, num_gpus, num_slots)
    out = np.empty(load.shape[0])
    ks = np.arange(1, num_gpus + 1, dtype=np.float64)
    for layer, row in enumerate(load):
        mean = row.sum() / num_gpus
        if mean == 0:
            out[layer] = 0.0
            continue
        cand = np.unique(np.concatenate([(row[:, None] / ks[None, :]).ravel(), [mean]]))
        cand = cand[cand >= mean]
        lo, hi = 0, len(cand) - 1  # cand[-1] ≥ max load: one replica each, always feasible

        while lo < hi:
            mid = (lo + hi) // 2
            if _need(row, cand[mid]) <= num_slots:
                hi = mid
            else:
                lo = mid + 1
        out[layer] = max(cand[lo], row.max() / num_gpus)
    return out


def _need(row: np.ndarray, t: float) -> int:
    """Slots needed so that no expert of ``row`` puts more than ``t`` on one GPU."""
    return int(np.maximum(1, np.ceil(row / t - 1e-12)).sum())


def replica_counts(load: np.ndarray, num_slots: int, max_count: int | None = None) -> np.ndarray:
    """[L, E] replica counts minimising the heaviest replica load (greedy water-filling, exact for that goal).

    Each extra slot goes to the expert with the largest load per replica (ties: lowest expert id) among those
    with fewer than ``max_count`` replicas (the replica cap: no more replicas than GPUs to hold them).
    """
    load = np.asarray(load, dtype=np.float64)
    L, E = load.shape
    cnt = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    if max_count is not None and num_slots > E * max_count:
        raise PlacementError(f"{num_slots} slots for {E} experts would give some expert more than "
                             f"{max_count} replicas")
    for _ in range(num_slots - E):
        per = load / cnt
        if max_count is not None:
            per = np.where(cnt < max_count, per, -np.inf)
        best = np.argmax(per, axis=1)
        cnt[rows, best] += 1
    return cnt


def check_cap(num_experts: int, num_gpus: int, num_slots: int) -> None:
    """The replica cap is satisfiable only with at most E × G slots (else some GPU holds an expert twice)."""
    if num_slots > num_experts * num_gpus:
        raise PlacementError(f"{num_slots} slots on {num_gpus} GPUs for {num_experts} experts: some GPU would "
                             f"hold two replicas of one expert (at most {num_experts * num_gpus} slots)")


def cap_violations(mapping: ExpertMapping) -> int:
    """(layer, GPU, expert) entries holding more than one replica (0 when the replica cap holds)."""
    L, G = mapping.num_layers, mapping.num_gpus
    key = (np.arange(L)[:, None] * G + mapping.slot_gpu()[None, :]) * mapping.num_experts + mapping.phy2log
    c = np.bincount(key.ravel(), minlength=L * G * mapping.num_experts)
    return int(np.maximum(c - 1, 0).sum())


def enforce_cap(load: np.ndarray, mapping: ExpertMapping) -> tuple[ExpertMapping, int]:
    """(mapping satisfying the replica cap, layers repaired): no expert on more than G slots, no GPU holding
    one expert twice. The safety net ``place`` runs after every algorithm of this project's own.

    Per violating layer: excess replicas of an expert held more than G times are handed to the expert with the
    largest load per replica that has fewer than G and is absent from that GPU; then each duplicate replica is
    swapped with a replica on another GPU (lacking this expert, and whose expert the first GPU lacks), the swap
    that leaves the pair's heavier GPU lightest. A layer where no such swap exists is dealt afresh
    (``simple.deal_bins``: always feasible) and improved by ``simple.refine_swaps``.
    """
    from moesim.placement.simple import deal_bins, layout, refine_swaps

    G, E = mapping.num_gpus, mapping.num_experts
    check_cap(E, G, mapping.num_slots)
    phy = mapping.phy2log.copy()
    gpu = mapping.slot_gpu()
    repaired = 0
    for layer in range(mapping.num_layers):
        row = phy[layer]
        has = np.zeros((G, E), dtype=np.int64)
        np.add.at(has, (gpu, row), 1)
        if has.max() <= 1:
            continue
        repaired += 1
        cnt = np.bincount(row, minlength=E)
        for x in np.nonzero(cnt > G)[0]:
            while cnt[x] > G:
                s = next(s for s in range(len(row)) if row[s] == x and has[gpu[s], x] > 1)
                per = np.where((cnt < G) & (has[gpu[s]] == 0), load[layer] / np.maximum(cnt, 1), -np.inf)
                y = int(np.argmax(per))
                has[gpu[s], x] -= 1
                has[gpu[s], y] += 1
                cnt[x] -= 1
                cnt[y] += 1
                row[s] = y
        w = load[layer] / np.maximum(cnt, 1)
        fill = np.bincount(gpu, weights=w[row], minlength=G)
        stuck = False
        while has.max() > 1 and not stuck:
            b, x = np.unravel_index(int(np.argmax(has)), has.shape)
            s = int(np.nonzero((row == x) & (gpu == b))[0][0])
            ok = (gpu != b) & (has[gpu, x] == 0) & (has[b, row] == 0)
            if not ok.any():
                stuck = True
                break
            d = w[row] - w[x]  # GPU b gains w[row[t]] − w[x]; GPU of t the opposite
            worst = np.maximum(fill[b] + d, fill[gpu] - d)
            t = int(np.argmin(np.where(ok, worst, np.inf)))
            c, y = gpu[t], row[t]
            has[b, x] -= 1
            has[b, y] += 1
            has[c, y] -= 1
            has[c, x] += 1
            fill[b] += w[y] - w[x]
            fill[c] += w[x] - w[y]
            row[s], row[t] = y, x
        if stuck:
            items = np.repeat(np.arange(E), cnt)[None]
            bins = refine_swaps(w[items], deal_bins(items, G), G, item_key=items)
            row[:] = layout(items, bins)[0]
        phy[layer] = row
    if not repaired:
        return mapping, 0
    return ExpertMapping(phy, G, E, dict(mapping.meta)), repaired


def _check_fit(load: np.ndarray, mapping: ExpertMapping) -> None:
    if load.ndim != 2 or load.shape != (mapping.num_layers, mapping.num_experts):
        raise PlacementError(f"load has shape {load.shape} but the mapping is for {mapping.num_layers} layers × "
                             f"{mapping.num_experts} experts")


# -- reading load statistics ---------------------------------------------------------------------------
def read_load(path: str | Path, model: ModelSpec | None = None) -> np.ndarray:
    """Read a load table [layers × experts] from JSON, CSV or .npy and validate it (and its shape vs ``model``).

    JSON: a list of rows, or an object with a ``load`` (or ``counts``) list of rows. CSV: one row per layer,
    numbers only (a first row of names is skipped). .npy: a 2-D numeric array (never unpickled).
    Values are non-negative weights: token-choice counts or fractional shares (averages, normalised loads) alike;
    ``moesim trace import --format counts`` stores token counts and refuses fractions, naming this command. An
    all-zero table is refused (nothing to place by); an all-zero *layer* is legal (placed like any other).
    """
    path = check_file(path, "load file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr: Any = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise PlacementError(f"load file {path} is not a readable .npy array: {exc}") from None
    elif suffix == ".json":
        try:
            data = parse_json(path.read_bytes().decode("utf-8"), f"load file {path}")
        except (UnicodeDecodeError, MoesimError) as exc:
            raise PlacementError(f"load file {path} is not valid JSON" + (
                f" ({exc})" if isinstance(exc, MoesimError) else "")) from None
        if isinstance(data, dict):
            key = next((k for k in ("load", "counts") if k in data), None)
            if key is None:
                raise PlacementError(f"load file {path}: JSON object needs a 'load' list of rows")
            data = data[key]
        arr = _rows(data, path)
    elif suffix in (".csv", ".txt"):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise PlacementError(f"load file {path} is not a text CSV file") from None
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and not _numeric(rows[0]):
            rows = rows[1:]
        bad = next((i for i, r in enumerate(rows) if not _numeric(r)), None)
        if bad is not None:
            raise PlacementError(f"load file {path}: row {bad + 1} is not all numbers")
        arr = _rows([[float(c) for c in r] for r in rows], path)
    else:
        raise PlacementError(f"load file {path}: unknown format {suffix!r} (use .json, .csv or .npy)")
    load = check_load(arr, f"load file {path}")
    if load.sum() <= 0:
        raise PlacementError(f"load file {path} is all zero: nothing to place by")
    if model is not None and load.shape != (model.num_layers, model.num_experts):
        raise PlacementError(f"load file {path} has shape {load.shape[0]}×{load.shape[1]} but model "
                             f"{model.name!r} has {model.num_layers} layers × {model.num_experts} experts")
    return load


def _numeric(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True


def _rows(data: Any, path: Path) -> np.ndarray:
    if not isinstance(data, list) or not data or not all(isinstance(r, list) for r in data):
        raise PlacementError(f"load file {path}: expected a list of rows [layers][experts]")
    if len({len(r) for r in data}) != 1:
        raise PlacementError(f"load file {path}: rows have different lengths")
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlacementError(f"load file {path}: entries must be numbers") from None
