"""Topology flags shared by every command with ``--topology``: --gpus, --nics, --nic-bw, --nvlink-bw."""

from __future__ import annotations

import argparse
from typing import Any


def add_topology_flags(p: argparse.ArgumentParser) -> None:
    """Flags beside ``--topology`` (same meaning as the ``NAME:N,gpus=..,nics=..`` spec options)."""
    p.add_argument("--gpus", type=int, metavar="N", help="use only the first N GPUs of the topology (whole nodes, or "
                                                        "part of the first node)")
    p.add_argument("--nics", type=int, metavar="K", help="NAME:N presets: NICs (rails) per node (default one per GPU)")
    p.add_argument("--nic-bw", type=float, metavar="GB/s", help="NAME:N presets: bandwidth per NIC, GB/s per direction")
    p.add_argument("--nvlink-bw", type=float, metavar="GB/s",
                   help="presets: NVLink (intra-node) bandwidth per GPU, GB/s per direction")


def topology_from_args(args: argparse.Namespace, spec: Any = None) -> Any:
    """``load_topology(args.topology)`` with the flags of :func:`add_topology_flags` (absent ones ignored)."""
    from moesim.topo import load_topology

    def gbs(v: float | None) -> float | None:
        return None if v is None else v * 1e9

    return load_topology(args.topology if spec is None else spec, gpus=getattr(args, "gpus", None),
                         nics=getattr(args, "nics", None), nic_bw=gbs(getattr(args, "nic_bw", None)),
                         nvlink_bw=gbs(getattr(args, "nvlink_bw", None)))
