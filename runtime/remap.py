"""Live remapping: move only the expert weights that must move, verify them, switch on all ranks at once.

Between steps, every rank derives the same transfer plan from (old mapping, new mapping): per layer, an expert
that a rank needs and does not hold is fetched from one of its current holders (holders take turns, so the
load spreads). Experts that stay on a rank keep their storage row (the slot map points the new slots at it).

Protocol (each line is collective, so no rank can be left waiting in a collective another rank skipped):
  1. prepare locally: gather the outgoing tensors, fingerprint each (float64 sum + position-weighted hash of
     the raw bits); all-gather the error strings — a rank that failed here stops everyone before any data moves;
  2. transfer: per layer, one ``all_to_all_single`` of flattened weights and one of fingerprints (splits
     every rank already knows), or a batch of point-to-point sends (``batch_isend_irecv``); both work on
     gloo and NCCL;
  3. verify every received tensor against the sender's fingerprint; all-gather the errors again;
  4. commit only if every rank verified: copy staged tensors into the rows freed by departing experts and
     switch slot maps and replica tables. Otherwise nothing was written and the old mapping stays in force.
A test hook (``fault=`` or ``MOESIM_REMAP_FAULT=corrupt:RANK|raise:RANK``) injects a failure.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from moesim.runtime.moe_layer import EPMoE, local_rows

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping


class RemapError(MoesimError):
    """A live remap failed; the old mapping is still in force on every rank."""


@dataclass
class Move:
    layer: int
    expert: int
    src: int  # rank sending
    dst: int  # rank receiving


def plan_moves(old: ExpertMapping, new: ExpertMapping) -> list[Move]:
    """Every (layer, expert, src, dst) transfer, in a deterministic order all ranks agree on."""
    moves = []
    for layer in range(old.num_layers):
        holders: dict[int, list[int]] = {}
        for g in range(old.num_gpus):
            for e in local_rows(old, layer, g):
                holders.setdefault(e, []).append(g)
        turn: dict[int, int] = {}
        for g in range(new.num_gpus):
            have = set(local_rows(old, layer, g))
            for e in local_rows(new, layer, g):
                if e in have:
                    continue
                hs = holders[e]
                src = hs[turn.get(e, 0) % len(hs)]
                turn[e] = turn.get(e, 0) + 1
                moves.append(Move(layer, e, src, g))
    return moves


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """[2] float64: the sum of the values and a position-weighted hash of their raw bits."""
    flat = t.detach().contiguous().view(-1)
    bits = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    h = ((bits * weights) % 2147483647).sum() % 2305843009213693951
    return torch.stack([flat.double().sum(), h.double()])


def _fault(fault: str | None, rank: int) -> str | None:
    spec = fault or os.environ.get("MOESIM_REMAP_FAULT")
    if not spec:
        return None
    kind, _, who = spec.partition(":")
    return kind if (not who or int(who) == rank) else None


def _errors(error: str) -> str:
    """Collective: every rank's error (empty when it succeeded), joined, so all ranks report the same cause."""
    errors: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    return "; ".join(failed[:3]) + (f"; and {len(failed) - 3} more ranks" if len(failed) > 3 else "")


def apply_mapping(layers: list[EPMoE], new: ExpertMapping, *, transport: str = "all2all",
                  fault: str | None = None) -> dict[str, Any]:
    """Switch every layer of this rank to ``new``; collective over the default group. Returns a summary
    (moved experts, bytes, seconds). Raises :class:`RemapError` on every rank when any rank failed.

    ``transport``: "all2all" (one ``all_to_all_single`` of flattened weights per layer) or "p2p" (one
    ``batch_isend_irecv`` per layer, only between the ranks that exchange experts, as vLLM's EPLB does)."""
    if transport not in ("all2all", "p2p"):
        raise RemapError(f"remap transport must be 'all2all' or 'p2p', got {transport!r}")
    t0 = time.perf_counter()
    old = layers[0].mapping
    rank, world = dist.get_rank(), dist.get_world_size()
    device = layers[0].store.w13.device
    fault_kind = _fault(fault, rank)
    # -- 1. plan and prepare (local) ------------------------------------------------------------------------
    error = ""
    try:
        if new.num_gpus != world or new.slots_per_gpu != old.slots_per_gpu or new.num_layers != len(layers) \
                or new.num_experts != old.num_experts:
            raise RemapError(f"new mapping ({new.num_gpus} GPUs × {new.slots_per_gpu} slots, {new.num_layers} "
                             f"layers) does not fit the running one ({world} × {old.slots_per_gpu}, {len(layers)})")
        moves = plan_moves(old, new)
        if fault_kind == "raise":
            raise RemapError(f"injected fault on rank {rank} while preparing the remap")
    except Exception as exc:
        error = f"rank {rank}: {exc}"
        moves = []
    error = _errors(error)
    if error:
        raise RemapError(f"remap aborted before any weight moved, old mapping kept: {error}")
    # -- 2/3. transfer and verify, layer by layer, into staging buffers --------------------------------------
    staged: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    moved_bytes = 0
    bad: list[str] = []
    try:
        for lay in layers:
            lm = [m for m in moves if m.layer == lay.layer]
            if not lm:
                continue
            row_of = lay.store.row_of()
            n13, n2 = lay.store.w13[0].numel(), lay.store.w2[0].numel()
            per = n13 + n2
            send = [m for m in lm if m.src == rank]  # grouped by dst below: all_to_all wants dst order
            send.sort(key=lambda m: m.dst)
            recv = sorted((m for m in lm if m.dst == rank), key=lambda m: m.src)
            send_split = [per * sum(1 for m in send if m.dst == g) for g in range(world)]
            recv_split = [per * sum(1 for m in recv if m.src == g) for g in range(world)]
            pieces = [torch.cat([lay.store.w13[row_of[m.expert]].reshape(-1),
                                 lay.store.w2[row_of[m.expert]].reshape(-1)]) for m in send]
            dtype = lay.store.w13.dtype
            out = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device)
            sums = torch.stack([fingerprint(p) for p in pieces]) if pieces else \
                torch.empty((0, 2), dtype=torch.float64, device=device)
            inbox = torch.empty(sum(recv_split), dtype=dtype, device=device)
            inbox_sums = torch.empty((len(recv), 2), dtype=torch.float64, device=device)
            if transport == "p2p":
                got_rows = inbox.view(len(recv), per)
                ops = [dist.P2POp(dist.isend, out[i * per:(i + 1) * per], m.dst) for i, m in enumerate(send)]
                ops += [dist.P2POp(dist.isend, sums[i], m.dst) for i, m in enumerate(send)]
                ops += [dist.P2POp(dist.irecv, got_rows[i], m.src) for i, m in enumerate(recv)]
                ops += [dist.P2POp(dist.irecv, inbox_sums[i], m.src) for i, m in enumerate(recv)]
                for req in dist.batch_isend_irecv(ops) if ops else []:
                    req.wait()
            else:
                dist.all_to_all_single(inbox, out, recv_split, send_split)
                dist.all_to_all_single(inbox_sums, sums, [s // per for s in recv_split],
                                       [s // per for s in send_split])
            if fault_kind == "corrupt" and inbox.numel():
                inbox[inbox.numel() // 2] += 1.0  # a bit flip on the wire
            got = inbox.view(len(recv), per) if recv else inbox.view(0, per)
            layer_staged = {}
            for i, m in enumerate(recv):  # verify all, keep going: every layer's collectives must still run
                if not torch.equal(fingerprint(got[i]), inbox_sums[i]):
                    bad.append(f"layer {m.layer} expert {m.expert} from rank {m.src} fails its checksum")
                layer_staged[m.expert] = (got[i, :n13].view_as(lay.store.w13[0]), got[i, n13:].view_as(lay.store.w2[0]))
            staged[lay.layer] = layer_staged
            moved_bytes += inbox.numel() * inbox.element_size()
        if bad:
            error = f"rank {rank}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    except Exception as exc:
        error = f"rank {rank}: {exc}"
    error = _errors(error)
    if error:
        raise RemapError(f"remap failed, old mapping kept: {error}")
    # -- 4. commit (local, cannot disagree) -------------------------------------------------------------------
    for lay in layers:
        wanted = local_rows(new, lay.layer, rank)
        rows = lay.store.row_expert
        free = [r for r, e in enumerate(rows) if e not in wanted]
        for e, (a, b) in staged.get(lay.layer, {}).items():
            r = free.pop(0)
            lay.store.w13[r].copy_(a)
            lay.store.w2[r].copy_(b)
            rows[r] = e
        for r in free:
            rows[r] = -1
        lay.set_mapping(new)
    total = torch.tensor([moved_bytes], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return {"ok": True, "moved_experts": len(moves), "moved_bytes": int(total.item()),
            "seconds": time.perf_counter() - t0}


def expert_checksums(layers: list[EPMoE]) -> dict[tuple[int, int], tuple[float, float]]:
    """(layer, logical expert) → fingerprint of the copy this rank holds (tests compare them across ranks)."""
    out = {}
    for lay in layers:
        for r, e in enumerate(lay.store.row_expert):
            if e >= 0:
                f = torch.stack([fingerprint(lay.store.w13[r]), fingerprint(lay.store.w2[r])]).flatten().tolist()
                out[(lay.layer, e)] = tuple(f)
    return out
