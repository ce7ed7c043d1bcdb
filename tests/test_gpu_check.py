"""tools/gpu_check.py --dry-run: the GPU check's own code on the CPU, so it cannot rot between GPU runs."""

import json
import sys

import pytest
from helpers import REPO, fake_fashion_mnist, run_script

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


@pytest.mark.e2e
def test_gpu_check_dry_run_passes_within_its_budgets_and_writes_its_summaries(tmp_path):
    out = tmp_path / "check"
    r = run_script(["tools/gpu_check.py", "--dry-run", "--out", str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    checks = result["checks"]
    assert not [c for c in checks if c["status"] == "FAIL"]
    assert {c["part"] for c in checks} == {"smoke", "bench", "learn", "compile"}
    smoke = [c["name"] for c in checks if c["part"] == "smoke" and c["status"] == "PASS"]
    # the collectives, mixed precision and every entry point ran (on the CPU here)
    for name in ("test_collectives_take_tensors_from_any_device", "test_kill_and_resume_on_the_device_is_bitwise",
                 "test_evaluations_and_detection_run_on_the_device", "test_pretraining_one_process[byol]"):
        assert name in smoke, smoke
    tests = [n for n in smoke if not n.startswith("pytest -k")]  # less the part's own summary line
    assert tests and not [n for n in tests if "compile" in n]  # compile is its own, last part
    assert result["bench"]["step_fp32_img_s"] > 0 and result["bench"]["pipeline_img_s"] > 0
    assert [c["status"] for c in checks if c["part"] == "learn"] == ["SKIP"]  # no --fashion-mnist given
    assert "| smoke |" in (out / "gpu_check.md").read_text()
    # The GPU's budgets, times DRY_RUN_SLOWDOWN for the CPU here.
    assert "gpu_check plan (1440s in all, the dry run: x3): smoke 540s, bench 225s, learn 540s, compile 135s" in r.stdout
    assert [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("--- ") and ": " in line] == \
        ["--- smoke", "--- bench", "--- learn", "--- compile"]  # every part ran, in the order of value


@pytest.mark.e2e
def test_gpu_check_learn_plans_steps_and_reports_each_method_against_both_baselines(tmp_path):
    data = fake_fashion_mnist(tmp_path / "idx", n_train=96, n_test=40)
    out = tmp_path / "check"
    r = run_script(["tools/gpu_check.py", "--dry-run", "--part", "learn", "--fashion-mnist", str(data),
                    "--out", str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # The plan comes first, in steps, so a cut run says how far it got.
    plan_line = next(line for line in r.stdout.splitlines() if line.startswith("learn plan:"))
    assert r.stdout.index("learn plan:") < r.stdout.index("PASS learn")
    assert "MoCo v2 3 steps = 1 epochs x 3 at batch 32" in plan_line and "ms/step measured" in plan_line
    result = json.loads((out / "gpu_check.json").read_text())
    lines = [c["name"] for c in result["checks"] if c["part"] == "learn" and c["status"] == "PASS"]
    assert lines == [f"{gpu_check.METHOD_NAMES[m]}: 3 steps, 1 epochs" for m in gpu_check.learn_methods()], lines
    for m in gpu_check.learn_methods():
        row = result["learn"][m]
        assert 0 <= row["linear"] <= 100 and row["raw_pixels"]["linear"] > 90  # the evaluation itself works
        best = max(row["random_init"]["linear"], row["raw_pixels"]["linear"])
        assert row["margin_linear"] == pytest.approx(row["linear"] - best)
    assert "| MoCo v2 | 3 | 1 |" in (out / "gpu_check.md").read_text()


def test_the_summary_survives_a_failed_environment_probe():
    checks = gpu_check.Checks()
    checks.add("smoke", "pytest", "PASS", 1.0)
    text = gpu_check.markdown({"device": "cuda:0", "error": "RuntimeError: CUDA driver too old"}, checks, {}, 60.0)
    assert "cuda:0" in text and "RuntimeError: CUDA driver too old" in text and "| smoke | pytest | PASS | 1.0 |" in text


def test_the_parts_budgets_fit_the_command_and_learn_gets_the_rest():
    assert gpu_check.plan_budgets(list(gpu_check.PARTS)) == {"smoke": 180, "bench": 75, "learn": 180, "compile": 45}
    assert sum(gpu_check.plan_budgets(list(gpu_check.PARTS)).values()) == gpu_check.TOTAL_S <= 8 * 60
    assert gpu_check.plan_budgets(["learn"]) == {"learn": gpu_check.TOTAL_S}
