"""The expert-mapping contract: derived tables agree with phy2log, files round-trip, bad mappings are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moesim.errors import MappingError
from moesim.mapping import FORMAT, VERSION, ExpertMapping
from moesim.models import ModelSpec, get_model


@st.composite
def mappings(draw) -> ExpertMapping:
    """A random valid mapping: every expert once per layer, redundant slots anywhere, slots shuffled."""
    layers, experts, gpus = draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 6))
    per_gpu = -(-experts // gpus) + draw(st.integers(0, 3))
    slots = per_gpu * gpus
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        rows.append(rng.permutation(row))
    return ExpertMapping(np.array(rows), gpus, experts)


def _check_tables(m: ExpertMapping) -> None:
    p2l, cnt, l2p = m.phy2log, m.logcnt, m.log2phy
    L, S, E = m.num_layers, m.num_slots, m.num_experts
    assert cnt.shape == (L, E) and l2p.shape == (L, E, int(cnt.max()))
    assert (cnt >= 1).all() and (cnt.sum(axis=1) == S).all()
    for layer in range(L):
        assert np.array_equal(cnt[layer], np.bincount(p2l[layer], minlength=E))
        seen = []
        for e in range(E):
            slots = l2p[layer, e]
            held = slots[slots >= 0]
            assert len(held) == cnt[layer, e]  # logcnt = replica count
            assert (slots[cnt[layer, e]:] == -1).all()  # padding only after the replicas
            assert (p2l[layer, held] == e).all()  # every slot in log2phy maps back
            assert list(held) == sorted(held)  # in slot order
            seen.extend(held.tolist())
        assert sorted(seen) == list(range(S))  # each slot listed exactly once
    assert m.num_slots == m.slots_per_gpu * m.num_gpus and m.num_redundant == S - E
    assert np.array_equal(m.slot_gpu(), np.repeat(np.arange(m.num_gpus), m.slots_per_gpu))
    for g in range(m.num_gpus):
        assert np.array_equal(m.gpu_experts(0, g), p2l[0, m.slot_gpu() == g])


@given(m=mappings())
def test_derived_tables_agree_with_phy2log(m):
    _check_tables(m)
    assert not m.phy2log.flags.writeable  # the contract cannot be changed behind the tables' back


@given(m=mappings())
def test_json_round_trip(tmp_path_factory, m):
    path = tmp_path_factory.mktemp("map") / "m.json"
    m.meta["algo"] = "test"
    m.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    back = ExpertMapping.load(path)
    assert back == m and back.meta == {"algo": "test"} and back.phy2log.dtype == np.int64
    assert ExpertMapping.from_dict(m.to_dict()) == m
    model = ModelSpec("m", num_layers=m.num_layers, num_experts=m.num_experts, top_k=1, hidden_size=8, ffn_size=8)
    assert ExpertMapping.load(path, model=model, num_gpus=m.num_gpus) == m


@given(m=mappings())
def test_sglang_round_trip(tmp_path_factory, m):
    data = m.to_sglang()
    assert list(data) == ["physical_to_logical_map"]
    assert np.array_equal(np.array(data["physical_to_logical_map"]), m.phy2log)
    back = ExpertMapping.from_sglang(json.loads(json.dumps(data)), num_gpus=m.num_gpus, num_experts=m.num_experts)
    assert back == m
    # load() recognises an SGLang file by its key, given the model and GPU count
    path = tmp_path_factory.mktemp("sg") / "sglang.json"
    path.write_text(json.dumps(data))
    model = ModelSpec("m", num_layers=m.num_layers, num_experts=m.num_experts, top_k=1, hidden_size=8, ffn_size=8)
    assert ExpertMapping.load(path, model=model, num_gpus=m.num_gpus) == m
    with pytest.raises(MappingError, match="needs the model"):
        ExpertMapping.load(path)
    with pytest.raises(MappingError, match="SGLang"):
        ExpertMapping.from_dict(data)


@given(layers=st.integers(1, 4), experts=st.integers(1, 40), gpus=st.integers(1, 9), extra=st.integers(0, 3),
       algo=st.sampled_from(["linear", "round_robin"]))
def test_constructors_are_valid(layers, experts, gpus, extra, algo):
    per_gpu = -(-experts // gpus) + extra
    m = getattr(ExpertMapping, algo)(layers, experts, gpus, per_gpu)
    assert m.num_layers == layers and m.num_gpus == gpus and m.slots_per_gpu == per_gpu
    _check_tables(m)
    assert (m.phy2log == m.phy2log[0]).all()  # the same placement in every layer
    # replicas are as even as possible: each expert held once, the extra slots go to experts 0, 1, ...
    assert m.logcnt.max() - m.logcnt.min() <= 1
    if algo == "linear" and experts % gpus == 0 and extra == 0:
        assert np.array_equal(m.phy2log[0], np.arange(experts))
    if algo == "round_robin":
        owner = m.slot_gpu()
        for e in range(experts):  # the first copy of expert e is dealt to GPU e % gpus
            held = m.log2phy[0, e]
            assert e % gpus in owner[held[held >= 0]]
    if experts % gpus == 0:
        assert getattr(ExpertMapping, algo)(layers, experts, gpus).slots_per_gpu == experts // gpus


def test_constructor_errors():
    with pytest.raises(MappingError, match="do not divide"):
        ExpertMapping.linear(2, 10, 4)
    with pytest.raises(MappingError, match="cannot hold"):
        ExpertMapping.round_robin(2, 10, 4, 2)


@pytest.mark.parametrize("p2l, gpus, experts, match", [
    ([[0, 1, 2, 2]], 2, 4, "layer 0: logical expert 3 is held by no slot"),
    ([[0, 1, 2, 3], [3, 2, 1, 1]], 2, 4, "layer 1: logical expert 0"),
    ([[0, 1, 2, 3, 0]], 2, 4, "5 physical slots per layer are not divisible by 2 GPUs"),
    ([[0, 1, 2, 3], [0, 1, 7, 3]], 2, 4, "layer 1 slot 2: expert id 7 is out of range"),
    ([[0, 1, -1, 3]], 2, 4, "layer 0 slot 2: expert id -1"),
    ([[0.5, 1, 2, 3]], 2, 4, "integer"),
    ([0, 1, 2, 3], 2, 4, "shape"),
    ([[0, 1]], 0, 2, "num_gpus"),
    ([[0, 1]], 1, 0, "num_experts"),
])
def test_invalid_mappings_name_layer_and_slot(p2l, gpus, experts, match):
    with pytest.raises(MappingError, match=match):
        ExpertMapping(np.array(p2l), gpus, experts)


@pytest.mark.parametrize("change, match", [
    ({"format": "other"}, "not a moesim mapping"),
    ({"version": VERSION + 1}, "unsupported mapping version"),
    ({"version": "1"}, "unsupported mapping version"),
    ({"phy2log": [[0, 1, 2, 3], [0, 1]]}, "different lengths|rectangular"),
    ({"phy2log": [["a", "b"]]}, "integer|rectangular"),
    ({"num_layers": 3}, "num_layers says 3"),
    ({"slots_per_gpu": 4}, "slots_per_gpu says 4"),
    ({"phy2log": None}, "rectangular"),
    ({"phy2log": [[1e30, 0, 1, 2], [0, 1, 2, 3]]}, "integer"),
    ({"num_gpus": "2"}, "num_gpus must be a positive integer, got '2'"),
    ({"num_gpus": None}, "num_gpus must be a positive integer"),
    ({"num_gpus": 2.5}, "num_gpus must be a positive integer"),
    ({"num_gpus": True}, "num_gpus must be a positive integer"),
    ({"num_experts": [4]}, "num_experts must be a positive integer"),
    ({"num_experts": 0}, "num_experts must be a positive integer"),
    ({"meta": 5}, "meta must be a JSON object"),
    ({"meta": [1]}, "meta must be a JSON object"),
])
def test_bad_json_is_refused_with_one_line(tmp_path, change, match):
    data = ExpertMapping.linear(2, 4, 2).to_dict()
    data.update(change)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MappingError, match=match) as info:
        ExpertMapping.load(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_missing_field_and_model_checks(tmp_path):
    data = ExpertMapping.linear(2, 4, 2).to_dict()
    del data["num_gpus"]
    with pytest.raises(MappingError, match="missing field 'num_gpus'"):
        ExpertMapping.from_dict(data)
    path = tmp_path / "m.json"
    ExpertMapping.linear(2, 4, 2).save(path)
    other = ModelSpec("other", num_layers=3, num_experts=4, top_k=1, hidden_size=8, ffn_size=8)
    with pytest.raises(MappingError, match="2 layers but model 'other' has 3"):
        ExpertMapping.load(path, model=other)
    with pytest.raises(MappingError, match="4 experts but model 'other' has 8"):
        ExpertMapping.load(path, model=other.with_(num_layers=2, num_experts=8))
    with pytest.raises(MappingError, match="for 2 GPUs but the cluster has 8"):
        ExpertMapping.load(path, num_gpus=8)


# -- SGLang: maps indexed by decoder layer ------------------------------------------------------------------
DSV3 = get_model("deepseek-v3")  # 3 dense + 58 MoE decoder layers, 256 experts


def _dsv3_mapping(seed: int = 0) -> ExpertMapping:
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([rng.permutation(256), rng.integers(0, 256, 32)]) for _ in range(58)]
    return ExpertMapping(np.array(rows), 32, 256)  # 288 slots: DeepSeek's prefill EP32 layout


def test_sglang_export_has_one_row_per_decoder_layer(tmp_path):
    """DeepSeek-V3: 61 rows as SGLang's ModelConfigForExpertLocation(num_layers=num_hidden_layers) expects; the
    dense layers' rows as init_trivial fills them (arange(P) % E)."""
    m = _dsv3_mapping()
    rows = np.array(m.to_sglang(DSV3.num_dense_layers)["physical_to_logical_map"])
    assert rows.shape == (61, 288)
    assert np.array_equal(rows[:3], np.tile(np.arange(288) % 256, (3, 1)))
    assert np.array_equal(rows[3:], m.phy2log)
    m.save_sglang(tmp_path / "sg.json", 3)
    assert ExpertMapping.load(tmp_path / "sg.json", model=DSV3, num_gpus=32) == m  # dense rows dropped
    # a 58-row map (per MoE layer) still loads
    (tmp_path / "moe.json").write_text(json.dumps(m.to_sglang()))
    assert ExpertMapping.load(tmp_path / "moe.json", model=DSV3, num_gpus=32) == m
    (tmp_path / "bad.json").write_text(json.dumps({"physical_to_logical_map": rows[:60].tolist()}))
    with pytest.raises(MappingError, match=r"60 layers \(rows\); the model has 58 MoE layers \(61 decoder"):
        ExpertMapping.load(tmp_path / "bad.json", model=DSV3, num_gpus=32)
    with pytest.raises(MappingError, match=r"reads \.json or \.pt"):
        m.save_sglang(tmp_path / "sg.txt", 3)


def test_sglang_pt_export_loads_as_sglang_loads_it(tmp_path):
    """compute_initial_expert_location_metadata: torch.load(path, weights_only=True) → dict → init_by_mapping(**d)."""
    torch = pytest.importorskip("torch")
    m = _dsv3_mapping(1)
    m.save_sglang(tmp_path / "sg.pt", 3)
    data = torch.load(str(tmp_path / "sg.pt"), weights_only=True)
    assert list(data) == ["physical_to_logical_map"]  # init_by_mapping(server_args, model_config, **data)
    t = data["physical_to_logical_map"]
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and tuple(t.shape) == (61, 288)
    assert np.array_equal(t.numpy()[3:], m.phy2log)
    assert ExpertMapping.load(tmp_path / "sg.pt", model=DSV3, num_gpus=32) == m
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(MappingError, match="not a readable torch file"):
        ExpertMapping.load(tmp_path / "junk.pt", model=DSV3, num_gpus=32)


def test_place_cli_writes_sglang_rows_for_every_decoder_layer(tmp_path, capsys):
    from moesim.cli import main

    load = np.random.default_rng(2).integers(0, 100, (58, 256))
    np.save(tmp_path / "load.npy", load)
    out, sg = tmp_path / "m.json", tmp_path / "sg.json"
    assert main(["place", "--load", str(tmp_path / "load.npy"), "--model", "deepseek-v3", "--topology",
                 "dgx-h100:4", "--slots-per-gpu", "9", "--algo", "linear", "--out", str(out),
                 "--sglang", str(sg)]) == 0
    rows = json.loads(sg.read_text())["physical_to_logical_map"]
    assert len(rows) == 61 and rows[3:] == ExpertMapping.load(out).phy2log.tolist()
    capsys.readouterr()
    assert main(["place", "--load", str(tmp_path / "load.npy"), "--model", "deepseek-v3", "--topology",
                 "dgx-h100:4", "--slots-per-gpu", "9", "--algo", "linear", "--out", str(tmp_path / "n.json"),
                 "--sglang", str(tmp_path / "sg.txt")]) == 2
    err = capsys.readouterr().err
    assert ".json or .pt" in err and err.count("\n") == 1 and not (tmp_path / "n.json").exists()
