"""tools/gpu_check.py --dry-run: the GPU check's own code on the CPU, so it cannot rot between GPU runs."""

import json

import pytest
from helpers import fake_fashion_mnist, run_script
from selfsup import recipes
from selfsup.methods import METHODS

pytestmark = pytest.mark.e2e  # every test here runs the scripts end to end


def test_gpu_check_dry_run_passes_and_writes_its_summaries(tmp_path):
    out = tmp_path / "check"
    r = run_script(["tools/gpu_check.py", "--dry-run", "--out", str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    checks = result["checks"]
    assert not [c for c in checks if c["status"] == "FAIL"]
    parts = {c["part"] for c in checks}
    assert parts == {"smoke", "bench", "learn"}
    smoke = [c["name"] for c in checks if c["part"] == "smoke" and c["status"] == "PASS"]
    # the collectives, mixed precision and every entry point ran (on the CPU here)
    for name in ("test_collectives_take_tensors_from_any_device", "test_kill_and_resume_on_the_device_is_bitwise",
                 "test_evaluations_and_detection_run_on_the_device", "test_pretraining_one_process[byol]"):
        assert name in smoke, smoke
    assert result["bench"]["step_fp32_img_s"] > 0 and result["bench"]["pipeline_img_s"] > 0
    assert [c["status"] for c in checks if c["part"] == "learn"] == ["SKIP"]  # no --fashion-mnist given
    assert "| smoke |" in (out / "gpu_check.md").read_text()
    assert "PASS smoke:" in r.stdout


def test_gpu_check_learn_runs_the_benchmark_and_reports_each_method(tmp_path):
    data = fake_fashion_mnist(tmp_path / "idx", n_train=96, n_test=40)
    out = tmp_path / "check"
    r = run_script(["tools/gpu_check.py", "--dry-run", "--part", "learn", "--fashion-mnist", str(data),
                    "--out", str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    lines = [c["name"] for c in result["checks"] if c["part"] == "learn" and c["status"] == "PASS"]
    titles = sorted(f"{recipes.PRESETS[recipes.small_preset(m)]['title']}: 1 epochs" for m in METHODS)
    assert lines == titles, result["checks"]  # BYOL, MoCo v2, SimCLR
    assert set(result["learn"]) == set(METHODS)
    assert all(0 <= result["learn"][m]["linear"] <= 100 for m in result["learn"])
