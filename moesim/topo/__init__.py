"""Cluster topologies for the simulator: the graph (:mod:`.graph`), device specs, preset builders, JSON I/O.

Import the public names from here: ``from moesim.topo import Topology, load_topology``.
"""

from moesim.topo.devices import DEVICES, DeviceSpec, get_device
from moesim.topo.graph import PRESETS, Topology, load_topology

__all__ = ["DEVICES", "PRESETS", "DeviceSpec", "Topology", "get_device", "load_topology"]
