"""A plain clone runs wherever torch and torchvision are installed (facebookresearch/moco's way,
and the GPU machine's only way: no pip there). Every entry point is started by an interpreter that
has torch, torchvision and numpy but not the project, from another working directory, with no
PYTHONPATH: the scripts find selfsup through the clone's _bootstrap alone, and so do the processes
they start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, THREADS, fake_fashion_mnist

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.e2e  # every test here runs the scripts end to end

ENTRY_POINTS = ["main_pretrain.py", "main_lincls.py", "main_knn.py", "tools/benchmark.py", "tools/fmnist_benchmark.py",
                "tools/gpu_check.py", "tools/make_demo_data.py", "tools/show_neighbors.py", "tools/plot_metrics.py",
                "tools/submitit_pretrain.py", "tools/submitit_lincls.py",
                "detection/convert_to_detectron2.py", "detection/train_torchvision.py", "detection/make_synthetic.py"]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A venv whose one site-packages entry is a .pth line naming the folder torch is installed in:
    Python adds that folder to sys.path but does not process the .pth files inside it, so an
    editable install of the project there is invisible."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    torch_site = Path(torch.__file__).resolve().parents[1]
    (Path(purelib) / "torch_only.pth").write_text(f"{torch_site}\n")
    probe = subprocess.run([str(python), "-c", "import torch, torchvision, numpy\ntry:\n import selfsup\n"
                            " print(selfsup.__file__)\nexcept ImportError:\n print('absent')"],
                           capture_output=True, text=True, cwd=venv, env=bare_env())
    assert probe.returncode == 0, probe.stderr
    if probe.stdout.strip() != "absent":
        pytest.skip(f"selfsup is installed beside torch ({probe.stdout.strip()}), not as an editable .pth")
    return python


def bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS)
    return env


def run(python: Path, args: list[str], cwd: Path, timeout: int = 600) -> str:
    r = subprocess.run([str(python), *args], cwd=cwd, env=bare_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_every_entry_point_starts_from_a_plain_clone(bare_python, tmp_path):
    for script in ENTRY_POINTS:
        assert "usage" in run(bare_python, [str(REPO / script), "--help"], tmp_path).lower(), script


def test_the_demo_and_an_evaluation_run_from_a_plain_clone(bare_python, tmp_path):
    out = run(bare_python, [str(REPO / "main_pretrain.py"), "--epochs", "1", "-b", "128", "--knn-every", "0",
                            "--output-dir", str(tmp_path / "demo")], tmp_path)
    assert "Done: 1 epochs" in out
    out = run(bare_python, [str(REPO / "main_knn.py"), "--pretrained", str(tmp_path / "demo" / "checkpoint.pth.tar"),
                            "--k", "20", "-j", "0", "--output-dir", str(tmp_path / "knn")], tmp_path)
    assert "20-NN" in out


def test_the_gpu_checks_learn_part_starts_its_runs_from_a_plain_clone(bare_python, tmp_path):
    # learn starts tools/fmnist_benchmark.py, which starts main_pretrain.py: each must find selfsup.
    data = fake_fashion_mnist(tmp_path / "idx", n_train=96, n_test=40)
    run(bare_python, [str(REPO / "tools/gpu_check.py"), "--dry-run", "--part", "learn", "--fashion-mnist", str(data),
                      "--out", str(tmp_path / "check")], tmp_path)
    result = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert [c["status"] for c in result["checks"]] == ["PASS"] * len(gpu_check.LEARN_DEFAULT), result["checks"]
