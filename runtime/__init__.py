"""moesim's live expert-parallel runtime: a Mixtral-architecture decoder on torch.distributed.

Data-parallel attention (each rank owns its own batch of sequences), expert-parallel MoE (experts placed by a
:class:`moesim.mapping.ExpertMapping`, redundant replicas included), two dispatch/combine backends, a recorder
that writes moesim traces with per-phase timings, and live remapping of expert weights between steps.

Single node (what ``moesim run`` does)::

    moesim run --nproc 4 --preset small --steps 16 --record out/

Many nodes: plain torchrun with the same entry point on every node (NCCL on GPUs), e.g. 2 nodes × 8 GPUs::

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK \
        --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 \
        -m moesim.runtime.worker --preset mixtral-8x7b --mapping m.json --steps 64 --record out/

(``python -m moesim.runtime.worker --help`` lists the worker's options; they are those of ``moesim run`` minus
``--nproc``. Validate inputs first with ``moesim run --check-only ...`` on one node.)

This package's ``__init__`` and :mod:`moesim.runtime.config` import no torch, so the CLI can validate a run before
any process starts; the other modules import torch.
"""

from moesim.runtime import lifeline as _lifeline

_lifeline.arm()  # first thing in a worker of `moesim run`: die with the launcher (see moesim.runtime.lifeline)
