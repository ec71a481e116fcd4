"""Readers for the real routing statistics in ``shared/data/routing`` (see its README.md).

Why: real load is the yardstick for synthetic traces and placement studies. Each reader returns an
:class:`~moesim.trace.sources.Imported` load-only trace with the matching model preset:

- ``mixtral-csv``: Mixtral-8x7B-Instruct ``expert_activation_count.csv`` / ``.npy`` [32 layers, 8 experts],
  119,010 assignments per layer (59,505 tokens): one step.
- ``olmoe``: allenai/OLMoE routing analysis ``expert_counts_all.json``; entries ``"<model>/<variant>/<domain>"``
  with ``layers`` [0, 7, 15], ``top_k`` and ``counts`` [3, E]. Each domain of the selection becomes one step
  (default selection ``olmoe/expert_counts``: arxiv, book, c4, github, tulu, wikipedia). Cross-layer
  co-occurrence entries are not loads and are refused.
- ``switch``: google/switch-base-128 ``expert_statistics_3d.json`` (specMoE): ``expert_usage_by_layer``
  {layer: {expert: count}} over encoder MoE layers 1, 3, ..., 11: one step.

Layers absent from a statistic are noted in meta (``layers``: the original indices, ``model_layers``: the
model's count) and the trace's model keeps only the layers present (``ModelSpec.with_(num_layers=...)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import TraceError
from moesim.models import ModelSpec, get_model
from moesim.trace.sources import Imported, as_array, check_totals, get_field, load_any, read_counts

OLMOE_MODELS = {"olmoe": "olmoe-1b-7b", "olmoe-sft": "olmoe-1b-7b", "olmoe-dpo": "olmoe-1b-7b",
                "mistral": "mixtral-8x7b"}


def _subset_model(model: ModelSpec, layers: list[int], notes: list[str], meta: dict[str, Any]) -> ModelSpec:
    """The model restricted to the layers a statistic holds (noted in meta)."""
    if any(not isinstance(x, int) or x < 0 for x in layers) or len(set(layers)) != len(layers):
        raise TraceError(f"layer list {layers[:8]} is not a list of distinct layer indices")
    meta["layers"] = layers
    if len(layers) < model.num_layers:
        absent = model.num_layers - len(layers)
        notes.append(f"the statistic holds {len(layers)} of {model.name}'s {model.num_layers} MoE layers "
                     f"({layers}); the {absent} absent layers are left out of the trace's model")
        meta["model_layers"] = model.num_layers
        return model.with_(num_layers=len(layers))
    return model


def read_mixtral_csv(path: Path, model: ModelSpec | None = None) -> Imported:
    """expert_activation_count.csv / .npy of Mixtral-8x7B-Instruct [32 layers, 8 experts]: one counts step."""
    imp = read_counts(path, model, default="mixtral-8x7b", source="mixtral-8x7b-expert-counts")
    imp.meta["citation"] = ("github.com/abhibambhaniya/mixtral-offloading-residency-info @78d7215, "
                            "notebooks/Mixtral_profiling.ipynb (MIT)")
    return imp


def read_olmoe(path: Path, select: str | None = None, model: ModelSpec | None = None) -> Imported:
    """allenai/OLMoE routing analysis expert_counts_all.json: each domain of the selection becomes one step."""
    path = Path(path)
    data = load_any(path, "OLMoE routing statistics")
    if not isinstance(data, dict) or not data:
        raise TraceError(f"{path.name} is not the OLMoE expert_counts_all.json object")
    select = select or "olmoe/expert_counts"
    keys = [select] if select in data else sorted(k for k in data if k.startswith(select.rstrip("/") + "/"))
    keys = [k for k in keys if k.count("/") == select.rstrip("/").count("/") + (0 if select in data else 1)]
    if not keys:
        known = sorted({k.rsplit("/", 1)[0] for k in data})
        raise TraceError(f"{path.name} has no entry {select!r}; choose a key or prefix among {', '.join(known)}")
    first = data[keys[0]]
    if not isinstance(first, dict) or "counts" not in first:
        raise TraceError(f"{path.name}: {keys[0]!r} holds no load counts (cross-layer co-occurrence tables are "
                         "not loads); select an 'expert_counts' entry")
    family = keys[0].split("/")[0]
    notes: list[str] = []
    meta: dict[str, Any] = {"source": "olmoe-routing-analysis", "files": [str(path)], "entries": keys,
                            "citation": "github.com/allenai/OLMoE @357454f, scripts/routing_output/ (Apache-2.0)"}
    if model is None:
        if family not in OLMOE_MODELS:
            raise TraceError(f"{path.name}: unknown model family {family!r}; pass --model")
        model = get_model(OLMOE_MODELS[family])
    steps, layers0 = [], None
    for key in keys:
        entry = data[key]
        layers = get_field(entry, "layers", f"{path.name}: {key}")
        counts = as_array(get_field(entry, "counts", f"{path.name}: {key}"), f"{key}: counts", (2,))
        if layers0 is None:
            layers0 = layers
        elif layers != layers0:
            raise TraceError(f"{path.name}: {key} covers layers {layers}, not {layers0} as {keys[0]}")
        if not isinstance(layers, list) or len(layers) != counts.shape[0]:
            raise TraceError(f"{path.name}: {key}: 'layers' does not match the counts' rows")
        top_k = entry.get("top_k", model.top_k)
        if top_k != model.top_k:
            if top_k == 1 and "top1" in key:
                notes.append(f"{key} counts only each token's first choice: the trace's model is top-1")
                model = model.with_(top_k=1)
            else:
                raise TraceError(f"{path.name}: {key} is top-{top_k}, model {model.name!r} top-{model.top_k}")
        if counts.shape[1] != model.num_experts:
            raise TraceError(f"{path.name}: {key} has {counts.shape[1]} experts, model {model.name!r} "
                             f"{model.num_experts}")
        steps.append(counts)
    assert layers0 is not None
    model = _subset_model(model, list(layers0), notes, meta)
    arr = np.stack(steps)
    meta["steps"] = keys
    if len(keys) > 1:
        notes.append(f"one step per entry: {', '.join(k.rsplit('/', 1)[-1] for k in keys)}")
    check_totals(arr, model, notes)
    return Imported(model, counts=arr, phases=["prefill"] * len(keys), meta=meta, notes=notes)


def read_switch(path: Path, model: ModelSpec | None = None) -> Imported:
    """specMoE's expert_statistics_3d.json of google/switch-base-128: one counts step over its MoE layers."""
    path = Path(path)
    data = load_any(path, "Switch routing statistics")
    usage = get_field(data, "expert_usage_by_layer", f"{path.name}")
    layers = data.get("layers") or sorted(int(k) for k in usage)
    model = model or get_model("switch-base-128")
    E = int(data.get("num_experts", model.num_experts))
    if model.num_experts != E:
        raise TraceError(f"{path.name} has {E} experts, model {model.name!r} has {model.num_experts}")
    if not isinstance(usage, dict) or not isinstance(layers, list):
        raise TraceError(f"{path.name}: expert_usage_by_layer must map layer -> {{expert: count}}")
    counts = np.zeros((len(layers), E), dtype=np.int64)
    for i, layer in enumerate(layers):
        per = usage.get(str(layer))
        if not isinstance(per, dict):
            raise TraceError(f"{path.name}: no usage for layer {layer}")
        for e, c in per.items():
            if not str(e).isdigit() or not 0 <= int(e) < E or not isinstance(c, int) or c < 0:
                raise TraceError(f"{path.name}: layer {layer}: bad entry {e!r}: {c!r}")
            counts[i, int(e)] = c
    notes: list[str] = []
    meta: dict[str, Any] = {"source": "switch-base-128-expert-counts", "files": [str(path)],
                            "citation": "github.com/cyanmishra92/specMoE, routing_data/expert_statistics_3d.json "
                                        "(MIT)", "layer_numbering": "encoder layer index (MoE every other layer)"}
    if len(layers) > model.num_layers:
        raise TraceError(f"{path.name} has {len(layers)} layers, model {model.name!r} {model.num_layers}")
    model = _subset_model(model, [int(x) for x in layers], notes, meta)
    arr = counts[None]
    check_totals(arr, model, notes)
    return Imported(model, counts=arr, phases=["prefill"], meta=meta, notes=notes)
