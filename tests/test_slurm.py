"""SLURM without a SLURM cluster: srun's variables read by selfsup.distributed (two processes
started by hand with them train as torchrun's do, bit for bit), SLURM's node-list grammar, and
tools/submitit_pretrain.py / submitit_lincls.py through submitit's local executor - a job run to
its end, and a job pre-empted mid-epoch that checkpoints, requeues itself and ends bitwise equal
to an uninterrupted run - and the requeue's timing against submitit's own signal handler with a
fake scontrol: right after the stop checkpoint, before the teardown, or by the watchdog."""

import argparse
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_image_folder, run_script, script_env, torchrun
from selfsup import distributed as D

import main_lincls
import main_pretrain

# 24 images, global batch 8: 3 steps per epoch, 2 epochs = 6 steps (as tests/test_fault_tolerance.py).
RUN = ["--method", "moco", "-a", "resnet18", "--image-size", "16", "-b", "8", "--epochs", "2", "--moco-k", "16",
       "--moco-dim", "16", "--mlp", "--aug", "moco_v2", "-p", "1", "--seed", "5", "-j", "0", "--device", "cpu"]
# The pre-emption test's run: 192 images, one epoch of 24 steps (0.35 s each on a 2-core Xeon), so that
# a signal sent when step 0 is logged arrives long before the epoch's end.
LONG_IMAGES, LONG_STEPS = 96, 24  # per class (2 classes), steps per epoch
LONG_RUN = [*RUN, "--epochs", "1"]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------- node lists

# SLURM_JOB_NODELIST forms and what `scontrol show hostnames` prints for them (checked against
# SLURM 22.05's scontrol; the suffix form against hostlist.c of SLURM 23.02.5 and later, which
# reads it). The order matters: the first host is where task 0 runs.
NODELISTS = [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("gpu-[1-2]-[3-4]", ["gpu-1-3", "gpu-1-4", "gpu-2-3", "gpu-2-4"]),
    ("rack[1-2]-node[01-02],gpu7", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02", "gpu7"]),
    ("node[8-10]", ["node8", "node9", "node10"]),  # the width is lo's: no padding here ...
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),  # ... three digits here
    ("n[01-2]", ["n01", "n02"]),
    ("learnfair[0218,0220-0221]", ["learnfair0218", "learnfair0220", "learnfair0221"]),
    ("nid0000[2-4]", ["nid00002", "nid00003", "nid00004"]),
    ("192.168.0.[5-6]", ["192.168.0.5", "192.168.0.6"]),
    ("hostA hostB", ["hostA", "hostB"]),
    ("a,,b", ["a", "b"]),
    ("x[1-2],x[2-3]", ["x1", "x2", "x2", "x3"]),
    ("n[1-2]x[3]", ["n1x3", "n2x3"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),  # SLURM >= 23.02.5 only
]
BAD_NODELISTS = ["n[1-3", "n1-3]", "n[3-1]", "n[a-b]", "n[]", "n[-1]", "n[[1]]", "n[0-99999]"]


@pytest.mark.parametrize("nodelist,hosts", NODELISTS)
def test_node_lists_expand_as_scontrol_show_hostnames(nodelist, hosts):
    assert D.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", BAD_NODELISTS)
def test_unreadable_node_lists_are_refused_naming_them(nodelist):
    with pytest.raises(ValueError, match=re.escape(nodelist)):
        D.expand_nodelist(nodelist)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="SLURM's scontrol is not installed")
def test_node_lists_match_the_installed_scontrol(tmp_path):
    # SLURM's own parser, where it is installed (apt-get install slurm-client). scontrol wants a
    # configuration even for this local command: a minimal one unless the machine has its own.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=debug Nodes=localhost Default=YES\n")
    env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", str(conf))}
    version = subprocess.run(["scontrol", "--version"], capture_output=True, text=True, env=env).stdout
    for nodelist, hosts in NODELISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, env=env)
        if "Invalid hostlist" in out.stdout + out.stderr and nodelist.endswith("-ib"):
            continue  # a SLURM older than 23.02.5 refuses a suffix
        assert out.stdout.split() == hosts == D.expand_nodelist(nodelist), (version, nodelist, out.stderr)


# ---------------------------------------------------------------------------------------------- srun's variables


def srun_env(rank: int, ntasks: int = 2, **extra: str) -> dict[str, str]:
    """What srun gives task `rank` of a one-node step of job 4242 (SLURM's variable names)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_STEP_NODELIST": "127.0.0.[1]",
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": str(ntasks),
            "SLURM_TASKS_PER_NODE": str(ntasks), "SLURM_STEP_ID": "0", **extra}


def test_an_srun_task_takes_its_world_from_slurm():
    env = D.launch_env(srun_env(1, ntasks=16, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_NODEID="1",
                                SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_ID="123456", SLURM_CPUS_PER_TASK="10"))
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("srun", 1, 16, 1, 8)
    # Step 0 of job 123456: 25000 + 123456 mod 7766 = 31966, past torchrun's 29400 and 29500: 31968.
    assert (env.master_addr, env.master_port, env.cpus_per_task) == ("gpu07", 31968, 10)
    assert "SLURM job 123456" in env.origin and "tcp://gpu07:31968" in env.origin
    # Uneven nodes: '3(x2),2' is 3, 3 and 2 tasks.
    assert D.launch_env(srun_env(7, ntasks=8, SLURM_STEP_TASKS_PER_NODE="3(x2),2", SLURM_NODEID="2")
                        ).local_world_size == 2


def test_master_addr_and_port_win_and_torchrun_wins_over_slurm():
    env = D.launch_env(srun_env(0, MASTER_ADDR="10.0.0.9", MASTER_PORT="29999"))
    assert (env.launcher, env.master_addr, env.master_port) == ("srun", "10.0.0.9", 29999)
    assert "MASTER_ADDR, MASTER_PORT" in env.origin
    # torchrun started inside an srun task: torchrun's variables describe the process.
    env = D.launch_env({**srun_env(1), "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                        "MASTER_ADDR": "node01", "MASTER_PORT": "29500"})
    assert (env.launcher, env.rank, env.world_size, env.local_world_size) == ("torchrun", 5, 16, 8)


def test_two_steps_of_one_job_get_two_ports_and_the_tasks_of_one_step_one():
    def port(rank: int, step: str, **extra: str) -> int:
        return D.launch_env(srun_env(rank, ntasks=4, SLURM_JOB_ID="123456", SLURM_STEP_ID=step, **extra)).master_port

    # Two srun in one batch script (steps 0 and 1, on one node, perhaps at once): two rendezvous.
    assert port(0, "0") != port(0, "1")
    # Each task of a step, and the step of that number after a requeue (SLURM keeps the job id and
    # numbers the steps from 0 again): one port. SLURM_STEPID is the older name of SLURM_STEP_ID.
    for step in ("0", "1", "7"):
        ports = {port(rank, step) for rank in range(4)} | {port(2, step, SLURM_RESTART_COUNT="1")}
        ports.add(D.launch_env({k: v for k, v in srun_env(3, ntasks=4, SLURM_JOB_ID="123456", SLURM_STEPID=step).items()
                                if k != "SLURM_STEP_ID"}).master_port)
        assert len(ports) == 1, (step, ports)
    # Every step of a job its own port (7766 of them), all unprivileged, none of Linux's ephemeral
    # ones (32768-60999), none of Lightning's 15000-24999 nor torchrun's defaults 29400 and 29500.
    for job in ("123456", "9", "987654321"):
        ports = [D.job_port(job, str(step)) for step in range(7766)]
        assert len(set(ports)) == 7766 and min(ports) >= 25000 and max(ports) <= 32767, job
        assert not {29400, 29500} & set(ports)
    # job_port's docstring: jobs whose ids differ by 1-1134 never collide in steps less than 5 apart.
    near = {(d, a, b) for d in range(1, 1135) for a in range(5) for b in range(5)
            if D.job_port("500000", str(a)) == D.job_port(str(500000 + d), str(b))}
    assert not near and D.job_port("500000", "0") == D.job_port("501135", "3")  # 1135 apart: the first one
    # MASTER_PORT wins; a step id that is not a number is one line naming it.
    assert D.launch_env(srun_env(0, SLURM_STEP_ID="batch", MASTER_PORT="29999")).master_port == 29999
    with pytest.raises(ValueError, match=r"SLURM_STEP_ID='batch' .*set MASTER_PORT"):
        D.launch_env(srun_env(0, SLURM_STEP_ID="batch"))


def test_a_batch_script_shell_is_one_process_and_says_why():
    # sbatch's own shell has SLURM_PROCID=0 but no step: a python started there without srun
    # must not wait for 15 partners that will never come.
    env = D.launch_env({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert (env.launcher, env.world_size) == (None, 1)
    assert "not started by srun" in env.origin
    assert D.launch_env({}).launcher is None


def test_one_task_on_a_node_of_several_gpus_is_refused_with_the_fix():
    alone = D.launch_env(srun_env(0, ntasks=2, SLURM_STEP_TASKS_PER_NODE="1(x2)"))
    with pytest.raises(ValueError, match=r"srun --ntasks-per-node=8 --gpus-per-task=1"):
        D.local_gpu(alone, None, None, cuda_count=8)
    assert D.local_gpu(alone, "cuda:0", None, cuda_count=8) == 0  # one GPU on purpose
    assert D.local_gpu(alone, "cpu", None, cuda_count=8) == 0
    # --gpus-per-task=1: each task sees its own GPU as GPU 0; else it takes GPU SLURM_LOCALID.
    shared = D.launch_env(srun_env(1, ntasks=2))
    assert D.local_gpu(shared, None, None, cuda_count=1) == 0
    assert D.local_gpu(shared, None, None, cuda_count=2) == 1
    torchrun_env = D.launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"})
    assert D.local_gpu(torchrun_env, None, None, cuda_count=8) == 1  # torchrun's choice is left alone


def test_loader_workers_and_error_lines_follow_the_srun_task(monkeypatch, capsys):
    from selfsup.cli import default_workers, report

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in srun_env(1, ntasks=8, SLURM_STEP_TASKS_PER_NODE="8", SLURM_CPUS_PER_TASK="5").items():
        monkeypatch.setenv(k, v)
    assert default_workers() == 4  # the task's 5 CPUs, one left for the process itself
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert default_workers() == 1  # 16 CPUs shared by the node's 8 tasks
    assert report(ValueError("bad flag")) == 2 and capsys.readouterr().err == ""  # task 1 leaves it to task 0
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert report(ValueError("bad flag")) == 2 and capsys.readouterr().err == "error: bad flag\n"


def test_broken_slurm_variables_are_one_line_each():
    with pytest.raises(ValueError, match="SLURM_STEP_TASKS_PER_NODE='8x2'"):
        D.launch_env(srun_env(0, SLURM_STEP_TASKS_PER_NODE="8x2"))
    with pytest.raises(ValueError, match="set MASTER_PORT"):
        D.launch_env(srun_env(0, SLURM_JOB_ID="abc"))


def job_id_with_a_free_port() -> str:
    """A job id whose derived rendezvous port is free on this machine now."""
    for job in range(4242, 14242, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", D.job_port(str(job))))
            except OSError:
                continue
        return str(job)
    raise RuntimeError("no free port in 25000-32767")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("slurm") / "imgs", classes=2, per_class=12, size=20)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted torchrun run of two gloo processes, the runs below' yardstick."""
    out = tmp_path_factory.mktemp("ref")
    r = torchrun(2, ["main_pretrain.py", str(folder), *RUN, "--output-dir", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return load(out / "checkpoint.pth.tar")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bitwise_equal(a, b):
    assert (a["epoch"], a["global_step"], a["world_size"]) == (b["epoch"], b["global_step"], b["world_size"])
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k


@pytest.mark.e2e
def test_two_srun_tasks_without_torchrun_equal_torchrun(folder, tmp_path, reference):
    out = tmp_path / "run"
    base = {k: v for k, v in script_env().items() if k not in LAUNCHER_ENV}
    job = job_id_with_a_free_port()
    tasks = [subprocess.Popen([sys.executable, "main_pretrain.py", str(folder), *RUN, "--output-dir", str(out)],
                              cwd=REPO, env={**base, **srun_env(rank, SLURM_JOB_ID=job)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [t.communicate(timeout=300)[0] for t in tasks]
    assert all(t.returncode == 0 for t in tasks), "\n".join(log[-3000:] for log in logs)
    assert_bitwise_equal(reference, load(out / "checkpoint.pth.tar"))
    assert f"world: 2 process(es) from SLURM job {job}" in logs[0], logs[0][-3000:]
    assert f"tcp://127.0.0.1:{D.job_port(job)}" in logs[0]  # the first host of '127.0.0.[1]', the job's port


# ---------------------------------------------------------------------------------------------- submitit


def test_the_launcher_checks_its_input_before_submitting(tmp_path, capsys):
    from selfsup.slurm import prepare, submit

    launcher, args = prepare(main_pretrain, ["--ngpus", "2", "--nodes", "1", "-b", "16", "--epochs", "3"])
    assert Path(args.output_dir).is_absolute() and args.output_dir == launcher.job_dir  # the script's own folder
    assert args.output_dir == str(Path(main_pretrain.resolve_config(main_pretrain.get_args_parser().parse_args(
        ["-b", "16", "--epochs", "3"])).output_dir).resolve())
    _, args = prepare(main_pretrain, ["--job-dir", str(tmp_path / "j"), "--epochs", "3"])
    assert args.output_dir == str(tmp_path / "j")
    for argv, message in ((["--no-resume"], "--no-resume cannot be used here"),
                          (["--multiprocessing-distributed"], "submitit starts one task per GPU"),
                          (["--job-dir", "a", "--output-dir", "b"], "name two folders"),
                          (["--ngpus", "3", "-b", "8"], "must divide by the 3 processes"),
                          (["--cluster", "local", "--nodes", "2"], "use --nodes 1")):
        assert submit(main_pretrain, argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_without_submitit_the_launcher_says_how_to_install_it(monkeypatch, capsys):
    from selfsup.slurm import submit

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    assert submit(main_pretrain, ["--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install submitit" in err and "pip install .[slurm]" in err


def test_without_sbatch_the_launcher_points_to_the_local_executor(monkeypatch, capsys):
    pytest.importorskip("submitit")
    from selfsup.slurm import submit

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert submit(main_pretrain, ["--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sbatch not found" in err and "--cluster local" in err


def test_a_requeued_run_resumes_from_the_job_folder(tmp_path):
    pytest.importorskip("submitit")
    from selfsup.slurm import SubmittedRun, prepare

    _, args = prepare(main_pretrain, ["--job-dir", str(tmp_path), "--resume", "/old/start.pth.tar"])
    run = SubmittedRun("main_pretrain", str(REPO), args)
    assert run.checkpoint().function.args.resume == "/old/start.pth.tar"  # nothing written yet
    (tmp_path / "checkpoint.pth.tar").write_bytes(b"")
    again = run.checkpoint().function
    assert isinstance(again, SubmittedRun) and again.args.resume == "" and again.args.output_dir == str(tmp_path)
    assert run.args.resume == "/old/start.pth.tar"  # the running job's own arguments stay as they are


def submit_local(tool: str, args: list[str], job_dir: Path) -> tuple[str, Path, str]:
    """Run `tool` with --cluster local; (job id, task 0's log, what the tool printed). The tool's
    output goes to a file: the local executor's controller keeps the tool's stdout open until
    the job ends, so a pipe would wait for the whole job."""
    printed = job_dir.parent / f"{job_dir.name}-submit.txt"
    with open(printed, "w") as f:
        r = subprocess.run([sys.executable, tool, "--cluster", "local", "--nodes", "1", "--ngpus", "2", "--timeout",
                            "20", "--job-dir", str(job_dir), *args], cwd=REPO, env=script_env(), stdout=f,
                           stderr=subprocess.STDOUT, timeout=300)
    text = printed.read_text()
    assert r.returncode == 0, text
    job = re.search(r"Submitted job (\d+)", text)[1]
    return job, job_dir / "submitit" / f"{job}_0_log.out", text


def children(pid: str) -> list[int]:
    """The processes whose parent is `pid` (the local executor's tasks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if fields[1] == pid:
            found.append(int(stat.parent.name))
    return found


def wait_for(condition, what: str, controller: str, timeout: float = 300, every: float = 0.2):
    """Poll `condition` every `every` seconds until true; on a time-out stop the job's controller
    (it forwards SIGTERM to its tasks) and fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            os.kill(int(controller), signal.SIGTERM)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


def task_results(job_dir: Path, job: str) -> tuple:
    path = job_dir / "submitit" / f"{job}_0_result.pkl"
    wait_for(path.exists, "task 0's result", job)
    wait_for(lambda: not children(job), "the job's tasks to end", job)
    with open(path, "rb") as f:
        return pickle.load(f)  # ('success', exit status) or ('error', traceback), written by submitit


@pytest.mark.e2e
def test_submitit_local_runs_a_two_task_job_to_the_end(folder, tmp_path, reference):
    pytest.importorskip("submitit")
    job_dir = tmp_path / "job"
    job, log, printed = submit_local("tools/submitit_pretrain.py", [str(folder), *RUN], job_dir)
    assert f"logs: {log}" in printed and f"follow: tail -f {log}" in printed
    assert task_results(job_dir, job) == ("success", 0), log.read_text()[-3000:]
    assert_bitwise_equal(reference, load(job_dir / "checkpoint.pth.tar"))
    assert "world: 2 process(es)" in log.read_text()


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("slurm-long") / "imgs", classes=2, per_class=LONG_IMAGES,
                             size=20)


@pytest.fixture(scope="module")
def long_reference(long_folder, tmp_path_factory):
    """LONG_RUN uninterrupted under torchrun (two gloo processes)."""
    out = tmp_path_factory.mktemp("long-ref")
    r = torchrun(2, ["main_pretrain.py", str(long_folder), *LONG_RUN, "--output-dir", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return load(out / "checkpoint.pth.tar")


@pytest.mark.e2e
def test_a_job_preempted_mid_epoch_checkpoints_requeues_and_ends_bitwise(long_folder, tmp_path, long_reference):
    pytest.importorskip("submitit")
    job_dir = tmp_path / "job"
    job, log, _ = submit_local("tools/submitit_pretrain.py", [str(long_folder), *LONG_RUN], job_dir)
    # The warning when step 0 is logged (seen within ~20 ms): 23 steps of the epoch are left (8 s on
    # a 2-core Xeon, still over a second at 0.05 s a step), so a stop honoured only at an epoch's
    # end fails here.
    first = re.compile(rf"Epoch: \[0\]\[ *0/{LONG_STEPS}\]")
    wait_for(lambda: log.exists() and first.search(log.read_text()), "the first step", job, every=0.02)
    tasks = children(job)
    assert len(tasks) == 2
    for pid in tasks:  # what SLURM does before a time limit or a pre-emption: the warning to every task
        os.kill(pid, signal.SIGUSR2)
    assert task_results(job_dir, job) == ("success", 0), log.read_text()[-3000:]
    text = log.read_text()
    # The stop path wrote a checkpoint mid-epoch where the signal found the run, rank 0 requeued the
    # job right after it (submitit's "Requeued job", then ours with the seconds since the warning,
    # both before the engine's own line: before the run left the engine, let alone tore down), and
    # the second run resumed from exactly there and finished.
    mid = re.search(r"SIGUSR2: checkpoint written at epoch 0 step (\d+);", text)
    assert mid and 1 <= int(mid[1]) < LONG_STEPS and "at the end of epoch" not in text, text[-3000:]
    requeued = re.search(r"SIGUSR2: requeue issued (\d+\.\d) s after the warning, right after the stop checkpoint",
                         text)
    assert requeued and text.index("Requeued job") < requeued.start() < mid.start(), text[-3000:]
    assert float(requeued[1]) < 30, requeued[0]
    assert text.count("Starting with JobEnvironment") == 2, text[-3000:]
    assert f"resumed from {job_dir / 'checkpoint.pth.tar'}: epoch 0, step {mid[1]}" in text, text[-3000:]
    assert_bitwise_equal(long_reference, load(job_dir / "checkpoint.pth.tar"))


@pytest.mark.parametrize("per_class,epoch,step,line", [
    (8, 0, 1, "SIGUSR2: checkpoint written at epoch 0 step 1;"),  # 2 steps per epoch: a stop mid-epoch
    (4, 1, 0, "SIGUSR2 at the end of epoch 0: checkpoint written"),  # 1 step per epoch: at the epoch's end
], ids=["mid-epoch", "epoch-end"])
def test_the_engine_reports_its_stop_checkpoint_the_moment_it_is_on_disk(tmp_path, monkeypatch, per_class, epoch,
                                                                          step, line):
    # What the SLURM requeue hangs on (StopRequest.on_checkpoint), for both stop checkpoints: called
    # once, with the checkpoint of the stop on disk, before the engine's own line about it (so
    # before the run leaves the engine, closes its metrics and tears its process group down).
    from selfsup.stopping import StopRequest

    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    data, out = make_image_folder(tmp_path / "imgs", classes=2, per_class=per_class, size=20), tmp_path / "run"
    seen = []

    def on_checkpoint():
        ckpt = load(out / "checkpoint.pth.tar")
        seen.append((ckpt["epoch"], ckpt["step"], line in (out / "log.txt").read_text()))

    stop = StopRequest(announce=False, on_checkpoint=on_checkpoint)
    stop._handle(signal.SIGUSR2, None)  # the warning before the first step: the run stops after it
    parser = argparse.ArgumentParser(parents=[main_pretrain.get_args_parser()])
    args = main_pretrain.resolve_config(parser.parse_args([str(data), *RUN, "--output-dir", str(out)]))
    assert main_pretrain.main(args, stop) == 128 + signal.SIGUSR2  # stopped before its last epoch
    assert seen == [(epoch, step, False)] and line in (out / "log.txt").read_text(), seen


# A stand-in for main_pretrain.main: its stop path (a stop at a step boundary, the checkpoint,
# checkpoint_written) and a slow teardown, with the wall-clock time of each event in args.times.
FAKE_SCRIPT = """
import os, signal, time


def main(args, stop):
    t = args.times
    stop.install()
    try:
        os.kill(os.getpid(), getattr(signal, args.send))  # SLURM's warning (or scancel's SIGTERM)
        while not stop.requested:
            time.sleep(0.001)
        t["warning"] = time.time()
        time.sleep(args.to_checkpoint)  # the rest of the step and the checkpoint's write (or a hang)
        if args.reports:
            t["checkpoint"] = time.time()
            stop.checkpoint_written()
    finally:
        stop.uninstall()
    t["teardown"] = time.time()
    time.sleep(args.teardown)  # the log line, the metrics, destroy_process_group waiting on a lost peer
    t["end"] = time.time()
    return 0
"""


@pytest.fixture
def slurm_task0(tmp_path, monkeypatch):
    """Task 0 of SLURM job 4242 as submitit runs it, in this process: submitit's own handler of
    the warning signal (checkpoint(), scontrol requeue, sys.exit) and a fake `scontrol` on PATH
    that writes down its arguments and when it ran. Returns run(**how) -> (what the job raised,
    the fake script's times, scontrol's calls as [(arguments, time.time())])."""
    submitit = pytest.importorskip("submitit")
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths

    from selfsup.slurm import SubmittedRun

    calls, bin_dir, folder = tmp_path / "scontrol.txt", tmp_path / "bin", tmp_path / "submitit"
    bin_dir.mkdir()
    folder.mkdir()
    scontrol = f"import sys, time\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + f' {{time.time()!r}}\\n')\n"
    (bin_dir / "scontrol").write_text(f"#!{sys.executable}\n{scontrol}")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for k in (*LAUNCHER_ENV, "_TEST_CLUSTER_"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**srun_env(0, ntasks=1, SLURM_JOB_ID="4242"), "SUBMITIT_EXECUTOR": "slurm",
                 "SUBMITIT_FOLDER": str(folder)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(logging.getLogger("submitit"), "propagate", logging.getLogger("submitit").propagate)
    module = f"fake_pretrain_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(FAKE_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}

    def run(send: str = "SIGUSR2", to_checkpoint: float = 0.2, reports: bool = True, teardown: float = 0.3):
        calls.unlink(missing_ok=True)
        times: dict[str, float] = {}
        args = argparse.Namespace(output_dir=str(tmp_path), resume="", times=times, send=send,
                                  to_checkpoint=to_checkpoint, reports=reports, teardown=teardown)
        job = SubmittedRun(module, str(tmp_path), args)
        delayed = DelayedSubmission(job)
        delayed.set_timeout(20, 3)
        handler = SignalHandler(submitit.JobEnvironment(), JobPaths(folder, job_id="4242"), delayed)
        signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)  # as submitit's process_job does
        try:
            job()
            raised = None
        except BaseException as e:  # submitit's exit, held until the run ended
            raised = e
        lines = calls.read_text().splitlines() if calls.exists() else []
        return raised, times, [(line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1])) for line in lines]

    yield run
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def requeue_line(caplog) -> re.Match | None:
    return re.search(r"SIGUSR2: requeue issued (\d+\.\d) s after the warning, (.*)", caplog.text)


def test_the_requeue_comes_right_after_the_stop_checkpoint_not_after_the_teardown(slurm_task0, caplog, tmp_path,
                                                                                   monkeypatch):
    import selfsup.slurm

    monkeypatch.setattr(selfsup.slurm, "REQUEUE_DEADLINE_S", 5.0)  # the watchdog looks every 0.5 s
    caplog.set_level(logging.INFO, logger="selfsup.slurm")
    raised, t, calls = slurm_task0(to_checkpoint=0.7, teardown=0.3)
    # scontrol ran once, between the checkpoint and the end of the stop path: not at the warning
    # (it would kill the job KillWait later, maybe before its checkpoint), and not after the
    # teardown (a process group waiting on a lost peer can outlast the time limit).
    assert [args for args, _ in calls] == ["requeue 4242"], calls
    assert t["checkpoint"] <= calls[0][1] < t["teardown"], (t, calls)
    assert (tmp_path / "submitit" / "4242_submitted.pkl").exists()  # the run to resubmit, from checkpoint()
    # submitit's exit came after the teardown (the script ran to its end), as its status -1.
    assert isinstance(raised, SystemExit) and raised.code == -1 and "end" in t, raised
    line = requeue_line(caplog)
    assert line and line[2] == "right after the stop checkpoint" and 0.7 <= float(line[1]) < 1.5, caplog.text


def test_the_watchdog_requeues_when_the_stop_checkpoint_does_not_come(slurm_task0, caplog, monkeypatch):
    import selfsup.slurm

    monkeypatch.setattr(selfsup.slurm, "REQUEUE_DEADLINE_S", 0.5)
    caplog.set_level(logging.INFO, logger="selfsup.slurm")
    raised, t, calls = slurm_task0(to_checkpoint=1.5, reports=False, teardown=0)  # a step that hangs
    assert [args for args, _ in calls] == ["requeue 4242"], calls
    assert t["warning"] + 0.45 <= calls[0][1] < t["warning"] + 1.2 < t["teardown"], (t, calls)  # 0.5 s in
    assert isinstance(raised, SystemExit) and raised.code == -1, raised
    line = requeue_line(caplog)
    assert line and line[2].startswith("by the watchdog: no stop checkpoint 0.5 s after the warning"), caplog.text


def test_a_run_that_reports_no_checkpoint_is_requeued_at_its_end_and_sigterm_requeues_nothing(slurm_task0, caplog):
    caplog.set_level(logging.INFO, logger="selfsup.slurm")
    raised, t, calls = slurm_task0(to_checkpoint=0, reports=False, teardown=0)
    assert len(calls) == 1 and calls[0][1] >= t["end"] and isinstance(raised, SystemExit), (t, calls, raised)
    assert requeue_line(caplog)[2] == "at the run's end (it reported no stop checkpoint)"
    caplog.clear()
    raised, t, calls = slurm_task0(send="SIGTERM")  # scancel: SLURM requeues a pre-empted job itself
    assert raised is None and calls == [] and "requeue issued" not in caplog.text


@pytest.mark.e2e
def test_submitit_lincls_runs_the_linear_evaluation_as_torchrun_does(reference, tmp_path):
    pytest.importorskip("submitit")
    data = tmp_path / "data"
    make_image_folder(data / "train", classes=2, per_class=6, size=20, seed=1)
    make_image_folder(data / "val", classes=2, per_class=3, size=20, seed=2)
    torch.save(reference, tmp_path / "pretrained.pth.tar")
    args = [str(data), "--pretrained", str(tmp_path / "pretrained.pth.tar"), "--epochs", "2", "-b", "4", "-j", "0",
            "--device", "cpu"]
    two = torchrun(2, ["main_lincls.py", *args, "--output-dir", str(tmp_path / "torchrun")])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    job_dir = tmp_path / "job"
    job, log, _ = submit_local("tools/submitit_lincls.py", args, job_dir)
    assert task_results(job_dir, job) == ("success", 0), log.read_text()[-3000:]
    a, b = (load(d / "checkpoint.pth.tar") for d in (tmp_path / "torchrun", job_dir))
    assert a["epoch"] == b["epoch"] == 2 and a["val"] == b["val"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.mark.e2e
def test_both_tools_start_like_the_other_tools():
    for tool in ("submitit_pretrain.py", "submitit_lincls.py"):
        r = run_script([f"tools/{tool}", "--help"])
        assert r.returncode == 0 and "--ngpus" in r.stdout and "--job-dir" in r.stdout, r.stderr
