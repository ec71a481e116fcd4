"""``moesim topo show / validate / export`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moesim.cli import main
from moesim.topo import load_topology


def test_show_table_and_json(capsys) -> None:
    assert main(["topo", "show", "dgx-h100:2", "--route", "0", "9"]) == 0
    out = capsys.readouterr().out
    assert "16 GPUs" in out and "450.0 GB/s" in out and "50.0 GB/s" in out and "gpu0 -> nvswitch0 -> gpu1" in out
    assert main(["topo", "show", "hgx-h800", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_gpus"] == 8 and s["per_gpu"]["alltoall_bw"] == 160e9 and s["latency"]["inter_node_max"] is None
    assert main(["topo", "show", "dgx-h100", "--route", "0", "99"]) == 2


def test_png(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.png"
    assert main(["topo", "show", "pcie-8gpu:2", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["topo", "show", "dgx-h100", "--png", str(tmp_path / "missing" / "t.png")]) == 2
    assert not (tmp_path / "missing").exists()


def test_export_validate_reload(tmp_path: Path, capsys) -> None:
    f = tmp_path / "c.json"
    assert main(["topo", "export", "dgx-h200:2", "--out", str(f)]) == 0
    assert main(["topo", "validate", str(f)]) == 0
    assert "valid" in capsys.readouterr().out
    t = load_topology(str(f))
    ref = load_topology("dgx-h200:2")
    assert t.device == ref.device and (t.routing_matrix() != ref.routing_matrix()).nnz == 0
    # a hand edit that breaks it: exit 2, one line, names the link
    data = json.loads(f.read_text())
    data["graph"]["links"][0]["bandwidth"] = -1
    f.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["topo", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "non-positive bandwidth" in err


def test_subprocess_entry_point(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "moesim", "topo", "show", "nonexistent-box"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    # moesim topo never imports torch
    code = ("import sys; from moesim.cli import main; main(['topo', 'show', 'dgx-h100']); "
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_show_with_a_cost_table(capsys) -> None:
    assert main(["topo", "show", "dgx-h100", "--model", "mixtral-8x7b", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["cost"]
    assert c["rows"][0]["bound"] == "memory" and c["rows"][-1]["bound"] == "compute"
    assert 150 < c["knee_tokens"] < 300  # ridge 295 FLOP/B scaled by mfu/mbu = 0.75
    assert main(["topo", "show", "dgx-h100", "--model", "gpt-17"]) == 2
    assert main(["topo", "show", "dgx-h100", "--model", "tiny", "--context-len", "-3"]) == 2
