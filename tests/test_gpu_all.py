"""bench/gpu_all.py (issue #26) runs its every section in CPU mode, so the one-command GPU run
cannot rot between the rare sessions that have a GPU: each row has figures or says why not."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_all.py"
SECTIONS = ["correctness", "speed", "memory", "end_to_end", "training"]


def gpu_all(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-all")
    done = gpu_all("--device", "cpu", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "gpu-report.json").read_text(encoding="utf-8"))


def test_every_section_has_figures_or_a_reason(cpu_run):
    _, report = cpu_run
    meta = report["meta"]
    assert meta["torch"] and meta["date"] and meta["gpu"].startswith("CPU") and meta["cuda"] is None
    assert meta["mode"] == "cpu quick" and meta["wall_s"] > 0
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["error"] is None, (name, section["error"])
        assert section["wall_s"] > 0 and section["rows"], name
        for row in section["rows"]:
            assert row["error"] is None, (name, row)  # no path is broken on the CPU
            assert bool(row["metrics"]) != bool(row["skipped"]), (name, row)  # figures, or why not
    rows = {(s, r["name"]): r for s, sec in report["sections"].items() for r in sec["rows"]}
    # Identity checks hold, and CUDA-only figures are skipped with the reason, never faked.
    assert rows["correctness", "streamed (budget 0) vs resident"]["metrics"]["identical"] is True
    assert rows["correctness", "Wan2.2 experts offloaded vs resident"]["metrics"]["identical"] is True
    assert 0 < rows["correctness", "bf16 on device vs fp32 CPU"]["metrics"]["rel_err"] < 0.05
    assert "CUDA only" in rows["correctness", "FP8 _scaled_mm vs bf16"]["skipped"]
    assert rows["speed", "wanx sdpa"]["metrics"]["s_step"] > 0
    for name in ("1.3B resident", "1.3B streamed 0", "14B FP8 streamed 6GB"):
        metrics = rows["memory", name]["metrics"]
        assert metrics["s_step"] > 0 and "peak_alloc_gb" not in metrics
        assert "peak: CUDA only" in rows["memory", name]["note"]
    streamed, resident = rows["memory", "1.3B streamed 0"]["metrics"], rows["memory", "1.3B resident"]["metrics"]
    assert streamed["weights_gb"] < resident["weights_gb"]
    # bench/quant.py's rows: the 14B DiT's bytes per format (computed on a CPU, never a fake measurement)
    held = {f: rows["memory", f"quant: 14B DiT {f}"]["metrics"] for f in ("bf16", "int8", "Q8_0", "Q4_K", "Q4_0")}
    assert all("weights_gb" not in m and m["x_bf16"] > 0 for m in held.values())
    assert held["bf16"]["computed_gb"] > held["Q8_0"]["computed_gb"] > held["int8"]["computed_gb"]
    assert held["Q4_K"]["computed_gb"] == held["Q4_0"]["computed_gb"] < 0.31 * held["bf16"]["computed_gb"]
    assert rows["end_to_end", "cache off"]["metrics"]["decode_s"] > 0
    assert rows["end_to_end", "4 steps, no CFG"]["metrics"]["total_s"] > 0
    assert rows["end_to_end", "context windows, 2x the frames"]["metrics"]["total_s"] > 0
    assert rows["training", "LoRA step: ckpt + offload act. + FP8"]["metrics"]["s_step"] > 0


def test_markdown_table_from_the_report(cpu_run):
    out, report = cpu_run
    table = (out / "gpu-report.md").read_text(encoding="utf-8")
    assert "| section | measurement | result | notes |" in table
    for section in SECTIONS:
        for row in report["sections"][section]["rows"]:
            assert f"| {row['name']} |" in table
    assert "| not measured" not in table  # every row of the catalogue ran (or says why it was skipped)
    printed = gpu_all("--markdown", str(out / "gpu-report.json"))
    assert printed.returncode == 0 and printed.stdout == table
    empty = gpu_all("--markdown", "none")
    lines = [line for line in empty.stdout.splitlines() if line.startswith("| ") and "measurement" not in line]
    assert lines and all("| not measured |" in line for line in lines)
    docs = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    docs = docs[docs.index("## One GPU run (bench/gpu_all.py)"):]
    for line in lines:  # the docs table has every row the script reports
        assert f"| {line.split(' | ')[1]} |" in docs, line


def test_bad_arguments_are_one_line_errors(tmp_path):
    done = gpu_all("--device", "cpu", "--only", "speed,bogus", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "unknown section(s) bogus" in done.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written
    done = gpu_all("--markdown", str(tmp_path / "missing.json"))
    assert done.returncode == 2 and "is not a file" in done.stderr


def test_a_failing_section_is_recorded_and_the_rest_go_on(tmp_path):
    """--deadline-s 0: every section refuses to start; each says so, and the report and table are still written."""
    done = gpu_all("--device", "cpu", "--quick", "--only", "memory,training", "--deadline-s", "0",
                   "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-report.json").read_text(encoding="utf-8"))
    assert list(report["sections"]) == ["memory", "training"]
    for section in report["sections"].values():
        assert section["error"].startswith("TimeoutError: not started") and section["rows"] == []
    table = (tmp_path / "gpu-report.md").read_text(encoding="utf-8")
    assert "| 14B FP8 streamed 6GB | not measured (section error: TimeoutError: not started" in table
    assert "| correctness | bf16 on device vs fp32 CPU | not measured |" in table  # a section not asked for
