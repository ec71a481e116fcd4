"""Builders for the preset machines: one 8-GPU node (NVSwitch or PCIe) and rail-optimised clusters of them.

Constants (per GPU, per direction unless said; see also ../shared/DESIGN.md "Facts to build on"):
- NVLink4 on H100/H200 SXM: 18 links × 25 GB/s = 450 GB/s per direction (900 GB/s bidirectional) through the
  NVSwitch fabric, every GPU pair at full rate — NVIDIA H100 datasheet, DGX H100 user guide. The 4 physical
  NVSwitch chips of a DGX/HGX board are modelled as one non-blocking switch ``nvswitch<n>``.
- H800: NVLink cut to 400 GB/s bidirectional = 200 GB/s per direction (NVIDIA H800 brief); DeepSeek measured
  ~160 GB/s achievable (DeepSeek-V3 technical report §3.2.1: "NVLink ... 160 GB/s"; the DeepEP README's
  intranode kernels reach ~153–158 GB/s on H800). ``hgx-h800`` uses the **achieved 160 GB/s**, because that is
  what an EP dispatch really gets and the preset exists to reproduce DeepSeek's deployment. The H100/H200
  presets keep the nominal 450 GB/s (no comparable EP measurement to substitute); scale a custom JSON if needed.
- NVLink latency: ASTRA-sim's validated HGX-H100 network uses ~0.94 µs per hop; DESIGN.md quotes ~1–2 µs.
  We charge 0.5 µs per GPU↔NVSwitch edge, so GPU→GPU inside a node costs 1.0 µs.
- PCIe Gen5 x16: 32 GT/s × 16 lanes ≈ 64 GB/s per direction (PCI-SIG PCIe 5.0 specification, 128b/130b
  encoding gives ~63 GB/s of payload; we use the round figure). 0.5 µs per PCIe hop (switch + DMA set-up;
  order of magnitude from CUDA p2pBandwidthLatencyTest results of 1–2 µs GPU→GPU through one switch).
- InfiniBand NDR: one ConnectX-7 at 400 Gb/s = 50 GB/s per GPU, one NIC per GPU, NIC i of every node on
  rail i (NVIDIA DGX SuperPOD reference architecture, "rail-optimised"). The NIC reaches its GPU through a
  PCIe Gen5 x16 switch (GPUDirect RDMA), modelled as the edge gpu<i>↔nic<i>. 0.6 µs per IB link (NIC/switch
  port traversal plus cable): same-rail GPU→GPU across nodes ≈ 2.2 µs, across pods ≈ 3.4 µs, within
  DESIGN.md's 2–5 µs (order of magnitude; calibrate from a run).
- Pods: 32 nodes per scalable unit (DGX SuperPOD SU of 32 DGX H100), one leaf switch per rail per pod
  (a 64-port Quantum-2 QM9700: 32 ports down, 32 up), 8 spine switches; each leaf's 32 uplinks are spread
  evenly over the spines (4 ports, 4 × the NIC rate, per leaf–spine pair), so the fabric is non-blocking. The
  leaf is the same switch however few nodes are attached: a 2-node cluster's leaf→spine links are still
  4 × 50 GB/s, never narrower than the NICs behind them.
- Knobs of ``NAME:N`` clusters (:func:`build_preset` keywords; ``NAME:N,nics=4,nic-bw=25,nvlink-bw=300`` or the
  CLI flags): ``nics`` NICs (rails) per node, GPU ``i`` of a node using NIC ``i // (gpus / nics)`` (e.g. 4 × 400G
  per 8-GPU node, two GPUs per NIC); ``nic_bw`` bytes/s per NIC (and per leaf port); ``nvlink_bw`` bytes/s per GPU
  per direction into the node's switch.

Routing between nodes (graph attribute ``routing``):
- ``rail-pxn`` (default, what NCCL does with PXN and what DeepEP does): traffic to a GPU on rail j first moves
  inside the source node to the GPU on rail j (NVLink; PCIe on a PCIe box), leaves through that GPU's NIC,
  crosses rail j's leaf (and a spine when the pods differ) and enters the destination through its own NIC.
  Cross-rail traffic therefore never needs the spine inside a pod.
- ``rail-spine``: traffic leaves through the source GPU's own NIC and crosses from rail i to rail j through a
  spine switch (no proxy GPU).
Where several spines could carry a flow, spine ``(src + dst) % num_spines`` does (a fixed hash, as ECMP).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx

from moesim.topo.devices import DEVICES, DeviceSpec

NVLINK4_BW = 450e9  # H100/H200 SXM, per direction
H800_NVLINK_BW = 160e9  # achieved (DeepSeek); nominal 200e9
NVLINK_EDGE_LATENCY = 0.5e-6  # GPU→NVSwitch→GPU = 1 µs
PCIE5_X16_BW = 64e9
PCIE_EDGE_LATENCY = 0.5e-6
IB_NDR_BW = 50e9  # ConnectX-7, 400 Gb/s
IB_EDGE_LATENCY = 0.6e-6
POD_NODES = 32
NUM_SPINES = 8
PCIE_GPUS_PER_SWITCH = 2  # a typical 8-GPU PCIe server: 4 Gen5 switches of 2 GPUs under the host root complex


@dataclass(frozen=True)
class NodeSpec:
    """One preset machine: its GPUs, the device they are, and how they are joined inside the node."""

    name: str
    device: DeviceSpec
    gpus: int
    fabric: str  # "nvswitch" | "pcie"
    intra_bw: float
    description: str


NODE_PRESETS: dict[str, NodeSpec] = {
    "dgx-h100": NodeSpec("dgx-h100", DEVICES["h100"], 8, "nvswitch", NVLINK4_BW,
                         "DGX H100: 8 H100 SXM on NVSwitch (NVLink4, 450 GB/s per direction per GPU)"),
    "dgx-h200": NodeSpec("dgx-h200", DEVICES["h200"], 8, "nvswitch", NVLINK4_BW,
                         "DGX H200: 8 H200 (141 GB, 4.8 TB/s HBM3e) on NVSwitch, 450 GB/s per direction per GPU"),
    "hgx-h800": NodeSpec("hgx-h800", DEVICES["h800"], 8, "nvswitch", H800_NVLINK_BW,
                         "HGX H800: 8 H800 on NVSwitch, NVLink 200 GB/s nominal, 160 GB/s achieved (DeepSeek)"),
    "pcie-8gpu": NodeSpec("pcie-8gpu", DEVICES["h100-pcie"], 8, "pcie", PCIE5_X16_BW,
                          "8 H100 PCIe, no NVLink: PCIe Gen5 x16 (64 GB/s per direction), 2 GPUs per PCIe switch"),
}


def _link(g: nx.DiGraph, a: str, b: str, bw: float, lat: float, kind: str) -> None:
    """Both directions of a full-duplex link."""
    g.add_edge(a, b, bandwidth=bw, latency=lat, kind=kind)
    g.add_edge(b, a, bandwidth=bw, latency=lat, kind=kind)


def build_node(g: nx.DiGraph, spec: NodeSpec, n: int, pod: int = 0, nics: int | None = None) -> None:
    """Add node ``n`` (GPUs ``n*gpus .. n*gpus+gpus-1`` and its internal switches) to ``g``; GPU ``r`` sits on
    rail ``r // (gpus / nics)``."""
    base = n * spec.gpus
    per_nic = spec.gpus // (nics or spec.gpus)
    for r in range(spec.gpus):
        g.add_node(f"gpu{base + r}", kind="gpu", index=base + r, node=n, rail=r // per_nic, pod=pod)
    if spec.fabric == "nvswitch":
        sw = f"nvswitch{n}"
        g.add_node(sw, kind="nvswitch", node=n)
        for r in range(spec.gpus):
            _link(g, f"gpu{base + r}", sw, spec.intra_bw, NVLINK_EDGE_LATENCY, "nvlink")
    else:
        host = f"host{n}"
        g.add_node(host, kind="host", node=n)
        for k in range((spec.gpus + PCIE_GPUS_PER_SWITCH - 1) // PCIE_GPUS_PER_SWITCH):
            sw = f"pcie{n}_{k}"
            g.add_node(sw, kind="pcie_switch", node=n)
            _link(g, sw, host, PCIE5_X16_BW, PCIE_EDGE_LATENCY, "pcie")
            for r in range(k * PCIE_GPUS_PER_SWITCH, min(spec.gpus, (k + 1) * PCIE_GPUS_PER_SWITCH)):
                _link(g, f"gpu{base + r}", sw, spec.intra_bw, PCIE_EDGE_LATENCY, "pcie")


def build_preset(name: str, num_nodes: int | None = None, *, nics: int | None = None, nic_bw: float | None = None,
                 nvlink_bw: float | None = None) -> tuple[nx.DiGraph, NodeSpec]:
    """The graph of a preset node (``num_nodes`` None) or of a cluster of ``num_nodes`` of them.

    ``nics`` (NICs per node, dividing its GPUs; default one per GPU), ``nic_bw`` (bytes/s per NIC) and
    ``nvlink_bw`` (bytes/s per GPU into the node fabric) override the preset's; see the module docstring.
    """
    spec = NODE_PRESETS[name]
    if nvlink_bw is not None:
        spec = replace(spec, intra_bw=float(nvlink_bw))
    rails = nics or spec.gpus
    if spec.gpus % rails:
        raise ValueError(f"{rails} NICs do not divide the {spec.gpus} GPUs of a {name} node")
    ib = IB_NDR_BW if nic_bw is None else float(nic_bw)
    g = nx.DiGraph()
    nodes = 1 if num_nodes is None else num_nodes
    pods = (nodes + POD_NODES - 1) // POD_NODES
    for n in range(nodes):
        build_node(g, spec, n, pod=n // POD_NODES, nics=rails)
    if num_nodes is None or num_nodes < 2:
        g.graph.update(routing="shortest")
        return g, spec
    for s in range(NUM_SPINES):
        g.add_node(f"spine{s}", kind="spine")
    for p in range(pods):
        for r in range(rails):
            leaf = f"leaf{p * rails + r}"
            g.add_node(leaf, kind="leaf", rail=r, pod=p)
            for s in range(NUM_SPINES):  # the leaf's POD_NODES uplink ports spread over the spines: non-blocking
                _link(g, leaf, f"spine{s}", POD_NODES * ib / NUM_SPINES, IB_EDGE_LATENCY, "ib")
    per_nic = spec.gpus // rails
    for n in range(nodes):
        p = n // POD_NODES
        for r in range(rails):
            i = n * rails + r
            nic = f"nic{i}"
            gpu = n * spec.gpus + r * per_nic  # the first GPU of the NIC's PCIe switch
            g.add_node(nic, kind="nic", index=i, node=n, rail=r, pod=p)
            if spec.fabric == "nvswitch":  # NIC and GPUs share a PCIe Gen5 switch; GPUDirect RDMA
                for k in range(per_nic):
                    _link(g, f"gpu{gpu + k}", nic, PCIE5_X16_BW, PCIE_EDGE_LATENCY, "pcie")
            else:  # on a PCIe box the NIC sits on the GPU's PCIe switch
                _link(g, f"pcie{n}_{(r * per_nic) // PCIE_GPUS_PER_SWITCH}", nic, PCIE5_X16_BW, PCIE_EDGE_LATENCY,
                      "pcie")
            _link(g, nic, f"leaf{p * rails + r}", ib, IB_EDGE_LATENCY, "ib")
    g.graph.update(routing="rail-pxn", rails=rails)
    return g, spec


def build_flat(num_gpus: int, link_bw: float, latency: float) -> nx.DiGraph:
    """A star: every GPU on one switch by one full-duplex link; GPU→GPU latency ``latency``."""
    g = nx.DiGraph()
    g.add_node("switch0", kind="switch", node=0)
    for i in range(num_gpus):
        g.add_node(f"gpu{i}", kind="gpu", index=i, node=0, rail=i)
        _link(g, f"gpu{i}", "switch0", link_bw, latency / 2, "link")
    g.graph.update(routing="shortest")
    return g
