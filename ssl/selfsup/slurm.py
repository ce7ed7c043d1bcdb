"""Submitting an entry script to a SLURM cluster through submitit, and requeueing it on pre-emption.

tools/submitit_pretrain.py and tools/submitit_lincls.py are this module applied to main_pretrain.py
and main_lincls.py: the launcher's flags (nodes, GPUs, partition, time limit, ...) come first, every
flag of the entry script after them. The job runs the script's own `main` in one task per GPU
(the tasks find their world through selfsup.distributed, as under srun), with --output-dir in
the job's folder, so a requeued job finds its checkpoint there and resumes.

Pre-emption and time limits: the job asks SLURM for submitit's warning signal (USR2, not USR1,
which some NCCL versions take for themselves: facebookincubator/submitit#1697) 120 seconds before
the end, as `#SBATCH --signal=USR2@120`. Pretraining stops at the next step boundary through its
own stop path (selfsup.stopping), writes a step checkpoint, and rank 0 requeues the job the
moment that checkpoint is on disk, before the run tears down (`Requeue`: submitit's handler, whose
`checkpoint` protocol resubmits this run again; a watchdog requeues anyway REQUEUE_DEADLINE_S
after the warning if no checkpoint came by then). `scontrol requeue` kills a running job (SIGTERM,
SIGKILL after the cluster's KillWait), which is why it waits for the checkpoint. Linear
evaluation, whose epochs are short, leaves the signal to submitit: requeued at once, it resumes
from its last epoch. A SIGTERM (scancel, or a pre-emption without the warning signal) also writes
the checkpoint but requeues nothing: SLURM requeues pre-empted jobs itself under PreemptMode=REQUEUE.

submitit is optional (`pip install submitit`, or the project's `slurm` extra); `--cluster local`
runs the same job on this machine through submitit's local executor, which is how the tests run it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

from .accumulation import micro_batches
from .cli import default_workers, report
from .errors import INPUT_ERRORS, UsageError
from .distributed import job_port, launch_env
from .stopping import StopRequest, exit_status, signal_name

WARNING_SECONDS = 120  # the warning signal comes this long before the time limit (SLURM may send it 60 s early)
# The watchdog's requeue after the warning when no stop checkpoint came: late enough for any step and
# checkpoint that can still make it (after the requeue the write goes on until SIGKILL, KillWait = 30 s
# by default, i.e. up to the time limit), early enough for `scontrol requeue` (30 s) before the limit.
REQUEUE_DEADLINE_S = WARNING_SECONDS - 30
MAX_TIMEOUTS = 30  # requeues after a time limit before the job gives up (facebookresearch/mae's setting)
INSTALL = "the SLURM launcher needs submitit: pip install submitit (or pip install .[slurm] in this repository)"
logger = logging.getLogger(__name__)


def get_launcher_parser(script: str) -> argparse.ArgumentParser:
    """The launcher's own flags; everything it does not know goes to `script` (e.g. main_pretrain.py)."""
    p = argparse.ArgumentParser(
        f"submitit_{Path(script).stem.removeprefix('main_')}.py", allow_abbrev=False,
        description=f"Submit {script} to SLURM through submitit: one task per GPU, requeued on pre-emption and "
                    f"time-outs. The launcher's flags come first; every other flag goes to {script} (see its "
                    "--help).")
    p.add_argument("--nodes", default=1, type=int, help="nodes to request (default: 1)")
    p.add_argument("--ngpus", default=8, type=int, help="GPUs per node, one task each (default: 8)")
    p.add_argument("--timeout", default=4320, type=int, help="time limit of each run of the job, in minutes "
                                                            "(default: 4320 = 72 h); the job requeues itself after it")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", default=None, help="SLURM account, passed through")
    p.add_argument("--qos", default=None, help="SLURM quality of service, passed through")
    p.add_argument("--constraint", default=None, help="SLURM node constraint (e.g. a GPU model), passed through")
    p.add_argument("--comment", default=None, help="SLURM comment, passed through")
    p.add_argument("--cpus-per-task", default=10, type=int, help="CPUs per task (default: 10)")
    p.add_argument("--mem-gb", default=None, type=int, help="memory per node in GB (default: 40 per GPU)")
    p.add_argument("--job-dir", default=None,
                   help=f"the job's folder on a file system every node sees: {script}'s --output-dir (checkpoints, "
                        "metrics) and submitit/ with the logs (default: the folder the script would choose, made "
                        "absolute)")
    p.add_argument("--cluster", default="slurm", choices=("slurm", "local"),
                   help="slurm (default): sbatch; local: submitit's local executor, the tasks on this machine "
                        "(--nodes 1; for testing)")
    return p


class Requeue:
    """Requeues the job once per run, on rank 0, when its warning signal stopped the run: right after
    the stop checkpoint is on disk (`stop.on_checkpoint`), or `deadline_s` after the warning if it
    is not by then (a watchdog thread: the step may hang on a lost peer; the previous checkpoint,
    written atomically, stays whole), or when the run returns 0 without having reported one.
    Never after the process group's teardown, which can outlast the warning.

    `requeue` is submitit's handler of the warning signal: it pickles the run's `checkpoint()`,
    runs `scontrol requeue` and ends the process with sys.exit (the local executor's requeue is
    that exit's status). The exit is held (`outcome`) and raised by `finish`, once the run has torn
    down; meanwhile SLURM's SIGTERM is only logged (submitit's handler) and its SIGKILL comes
    KillWait later. One log line gives the seconds from the warning to the requeue and why then.
    Used as a context manager around the run (it starts and stops the watchdog)."""

    def __init__(self, stop: StopRequest, requeue: Callable[[int, object], None], warning: int,
                 deadline_s: float = REQUEUE_DEADLINE_S) -> None:
        self.stop, self.requeue, self.warning, self.deadline_s = stop, requeue, warning, deadline_s
        self.why: str | None = None  # set once, by whichever of the three comes first
        self.seconds: float | None = None  # from the warning to the requeue
        self.outcome: BaseException | None = None  # what submitit's handler raised (its exit)
        self._claim = threading.Lock()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="requeue-watchdog", daemon=True)
        stop.on_checkpoint = self.after_checkpoint

    def __enter__(self) -> "Requeue":
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self._watchdog.join()

    @property
    def warned(self) -> bool:
        return self.stop.signum == self.warning

    def after_checkpoint(self) -> None:
        if self.warned:
            self._issue("right after the stop checkpoint")

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.deadline_s / 10)):
            if self.warned and time.monotonic() - self.stop.at >= self.deadline_s:
                self._issue(f"by the watchdog: no stop checkpoint {self.deadline_s:g} s after the warning (the "
                            "requeued run resumes from the last checkpoint on disk)")
                return

    def finish(self, status: int) -> None:
        """After the run returned `status`: requeue if the warning came, nothing requeued yet and
        the run ended well, then raise the requeue's exit, if any."""
        if self.warned and self.why is None and status == 0:
            self._issue("at the run's end (it reported no stop checkpoint)")
        if self.outcome is not None:
            raise self.outcome

    def _issue(self, why: str) -> None:
        with self._claim:
            if self.why is not None:
                return
            self.why = why
        self.seconds = time.monotonic() - self.stop.at
        try:
            self.requeue(self.warning, None)
        except BaseException as e:  # submitit's SystemExit, or why it did not requeue
            self.outcome = e
        name = signal_name(self.warning)
        if self.outcome is None or isinstance(self.outcome, SystemExit):
            logger.info("%s: requeue issued %.1f s after the warning, %s", name, self.seconds, why)
        else:
            logger.error("%s: requeue %.1f s after the warning, %s, failed: %s", name, self.seconds, why, self.outcome)


class SubmittedRun:
    """One run of an entry script as a submitit job, called in every task.

    Holds the script's module name, its folder and its resolved arguments, all plain values that
    pickle. `checkpoint` is submitit's protocol (submitit.helpers.Checkpointable): the run to
    resubmit when the job is requeued, this one again, which resumes from the job folder."""

    def __init__(self, module: str, folder: str, args: argparse.Namespace) -> None:
        self.module, self.folder, self.args = module, folder, args

    def __call__(self) -> int:
        import submitit

        logging.getLogger("submitit").propagate = False  # it has its own handler; the scripts' would repeat it
        job = submitit.JobEnvironment()
        if job.cluster != "slurm":  # submitit's local executor: its tasks get what torchrun would give them
            os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
                              LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(job_port(job.raw_job_id)))
        if self.folder not in sys.path:
            sys.path.insert(0, self.folder)
        script = importlib.import_module(self.module)
        args = copy.copy(self.args)
        if getattr(args, "workers", 0) is None:  # from the CPUs of the node it runs on
            args.workers = default_workers()
        warning = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        handler = signal.getsignal(warning)  # submitit's: checkpoint(), requeue, exit (on global rank 0)
        if "stop" not in inspect.signature(script.main).parameters:  # submitit's handler requeues at the signal
            status = script.main(args)
        elif job.global_rank == 0 and callable(handler):  # a stop path with step checkpoints
            stop = StopRequest(announce=launch_env().rank == 0)
            with Requeue(stop, handler, warning, REQUEUE_DEADLINE_S) as requeue:
                status = script.main(args, stop)
            requeue.finish(status)
        else:
            status = script.main(args, StopRequest(announce=launch_env().rank == 0))
        if status and status != exit_status(warning):  # stopped by the warning: requeued, not failed
            raise RuntimeError(f"{self.module}.py ended with exit status {status}; its log above says why")
        return 0

    def checkpoint(self, *args, **kwargs):
        """The run submitit resubmits on requeue: this one, resuming from the job folder's latest
        checkpoint (a --resume given at submission would go back to where the job started)."""
        from submitit.helpers import DelayedSubmission

        resumed = copy.copy(self.args)
        if (Path(resumed.output_dir) / "checkpoint.pth.tar").exists():
            resumed.resume = ""
        return DelayedSubmission(type(self)(self.module, self.folder, resumed))


def prepare(script: ModuleType, argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(launcher flags, the script's resolved arguments) from `argv`, checked before anything is
    submitted: a typo should fail here, not hours later in the queue. Raises UsageError."""
    name = Path(script.__file__).name
    launcher, rest = get_launcher_parser(name).parse_known_args(argv)
    given = argparse.ArgumentParser(name, parents=[script.get_args_parser()]).parse_args(rest)
    args = script.resolve_config(given)
    for flag, why in (("multiprocessing_distributed", "submitit starts one task per GPU itself"),
                      ("no_resume", "a requeued job must resume from its folder; give a new --job-dir instead")):
        if getattr(args, flag, False):
            raise UsageError(f"--{flag.replace('_', '-')} cannot be used here: {why}")
    if launcher.nodes < 1 or launcher.ngpus < 1 or launcher.timeout < 1:
        raise UsageError("--nodes, --ngpus and --timeout must be positive")
    if launcher.cluster == "local" and launcher.nodes != 1:
        raise UsageError("--cluster local runs the tasks on this machine: use --nodes 1")
    if launcher.job_dir and given.output_dir and Path(launcher.job_dir).resolve() != Path(given.output_dir).resolve():
        raise UsageError("--job-dir and --output-dir name two folders: give --job-dir alone, the job writes there")
    args.output_dir = launcher.job_dir = str(Path(launcher.job_dir or args.output_dir).resolve())
    if getattr(args, "batch_size", None) is not None:
        micro_batches(args.batch_size, launcher.nodes * launcher.ngpus, getattr(args, "accum_iter", None),
                      getattr(args, "micro_batch", None))
    return launcher, args


def submit(script: ModuleType, argv: list[str]) -> int:
    """Submit `script` (main_pretrain or main_lincls) with `argv`: print the job id, the log files
    and how to follow them; return the exit status (2 with one line for bad input)."""
    try:
        launcher, args = prepare(script, argv)
    except INPUT_ERRORS as e:
        return report(e)
    try:
        import submitit
    except ImportError:
        print(f"error: {INSTALL}", file=sys.stderr)
        return 2
    if launcher.cluster == "slurm" and shutil.which("sbatch") is None:
        print("error: sbatch not found: this is not a SLURM login node (--cluster local runs the job on this machine "
              "through submitit's local executor)", file=sys.stderr)
        return 2
    folder = Path(launcher.job_dir) / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher.cluster, slurm_max_num_timeout=MAX_TIMEOUTS)
    slurm = {k: v for k, v in (("partition", launcher.partition), ("account", launcher.account),
                                ("qos", launcher.qos), ("constraint", launcher.constraint),
                                ("comment", launcher.comment)) if v is not None}
    executor.update_parameters(
        name=f"selfsup-{Path(script.__file__).stem.removeprefix('main_')}", nodes=launcher.nodes,
        gpus_per_node=launcher.ngpus, tasks_per_node=launcher.ngpus, cpus_per_task=launcher.cpus_per_task,
        mem_gb=launcher.mem_gb or 40 * launcher.ngpus, timeout_min=launcher.timeout,
        slurm_signal_delay_s=WARNING_SECONDS, **{f"slurm_{k}": v for k, v in slurm.items()})
    job = executor.submit(SubmittedRun(script.__name__, str(Path(script.__file__).resolve().parent), args))
    out = job.paths.stdout
    print(f"Submitted job {job.job_id} ({launcher.cluster}: {launcher.nodes} node(s) x {launcher.ngpus} task(s)), "
          f"writing to {launcher.job_dir}")
    print(f"logs: {out} and {job.paths.stderr} (task N: {job.job_id}_N_log.*)")
    print(f"follow: tail -f {out}" + (f"   state: squeue -j {job.job_id}   stop: scancel {job.job_id}"
                                       if launcher.cluster == "slurm" else ""))
    return 0
