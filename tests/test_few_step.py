"""bench/few_step.py (issue 28) in its quick mode: 4 steps at guidance 1 run one DiT pass a step
(counted by its forward pre-hook), the defaults two a step (batched CFG), and the GPU part says
why it did not run instead of failing."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_few_step_counts_forwards(tmp_path):
    out = tmp_path / "few_step.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "few_step.py"), "--quick", "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    dit, demo = report["dit"], report["demo"]
    assert (dit["default"]["calls"], dit["default"]["passes"]) == (50, 100)  # 50 steps, cond + uncond batched
    assert (dit["4 steps, no CFG"]["calls"], dit["4 steps, no CFG"]["passes"]) == (4, 4)  # one pass a step
    assert (demo["default"]["calls"], demo["default"]["passes"]) == (20, 40)  # the demo model's 20 steps, CFG 4
    assert (demo["4 steps, no CFG"]["calls"], demo["4 steps, no CFG"]["passes"]) == (4, 4)
    assert all(r["seconds"] > 0 for part in (dit, demo) for r in part.values())
    assert report["gpu"] is None and "skipped: no CUDA device here" in done.stdout
    assert "default / 4 steps" in done.stdout and "25.0x" in done.stdout
