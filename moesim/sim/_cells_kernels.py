"""numba kernel of the SendCells count (:class:`moesim.sim.cells.SendCellCounter`; imported only where numba is
installed): one pass over a layer's choices instead of numpy's gathers, mask and three bincounts, same counts."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def count_layer(slot: np.ndarray, step_slot: np.ndarray, o_slot: np.ndarray, row_src: np.ndarray,
                row_dst: np.ndarray, cell_of: np.ndarray, dst_of: np.ndarray, slot_gpu: np.ndarray, dedup: bool,
                slot_out: np.ndarray, src_out: np.ndarray, dst_out: np.ndarray) -> None:
    """slot [k, T] -> adds each choice to slot_out[step_slot[t] + slot] and, unless it repeats an earlier choice's
    destination GPU (``dedup``, as cells.dedup_rows), to src_out[row_src[t] + cell_of[o_slot[t] + slot]] and
    dst_out[row_dst[t] + dst_of[o_slot[t] + slot]] (all flat float64 arrays, added to in place)."""
    k, T = slot.shape
    g = np.empty(k, dtype=slot_gpu.dtype)
    for t in range(T):
        o, rs, rd, ss = o_slot[t], row_src[t], row_dst[t], step_slot[t]
        for j in range(k):
            s = slot[j, t]
            slot_out[ss + s] += 1.0
            gj = slot_gpu[s]
            g[j] = gj
            if dedup:
                dup = False
                for i in range(j):
                    if g[i] == gj:
                        dup = True
                if dup:
                    continue
            at = o + s
            src_out[rs + cell_of[at]] += 1.0
            dst_out[rd + dst_of[at]] += 1.0
