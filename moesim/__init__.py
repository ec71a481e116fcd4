"""moesim: expert-parallel MoE inference — traces, placement, simulation, and the loop to a live runtime.

The simulator side (this package) needs numpy, scipy, networkx and simpy only: never torch.
"""

from moesim.errors import MappingError, MoesimError, TraceError
from moesim.mapping import ExpertMapping
from moesim.models import PRESETS, ModelSpec, get_model

__version__ = "0.1.0"

__all__ = [
           "PRESETS",
           "ExpertMapping",
           "MappingError",
           "ModelSpec",
           "MoesimError",
           "TraceError",
           "__version__",
           "get_model",
]
