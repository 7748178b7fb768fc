"""A dying peer (issue 20): of two `jax.distributed` processes on localhost (gloo), one is SIGKILLed with
its whole process group (what a preempted host gets); the other must exit with status 1 and, as its last line
on stderr, the one-line message of viper_jax/peer_loss.py naming the lost peer and
distributed.heartbeat_timeout_s: no Python traceback, no XLA abort with its C++ stack trace, no hang.

The three ways the news reaches a survivor (peer_loss.py): a collective failing at once (gloo's
"Connection closed by peer"), the coordinator's death seen by the other's coordination agent, and missed
heartbeats seen by the coordination service while the survivor runs no collective. The worker
(tests/multidevice/peer_loss_worker.py) runs as `viper train` does: supervised, inside stop_on_peer_loss.
A hang shows as the survivor still running GUARD_S after the kill (the heartbeat timeout is 5 s).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multidevice" / "peer_loss_worker.py"
HEARTBEAT_S = 5
GUARD_S = 60  # a failure guard against a hang, not a timing assert: the expected exit comes within ~5 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, text: str, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert all(p.poll() is None for p in procs), f"a worker ended before {text!r}: {path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("mode,victim,cause", [
    ("collective", 1, r"Gloo AllGather failed: .*(closed|reset) by peer"),  # process 0's allgather fails at once
    ("collective", 0, r"process 0 is gone|(closed|reset) by peer"),  # the coordinator: whichever notices first
    ("quiet", 1, r"no heartbeat from process 1"),  # process 0 runs no collective: the service's heartbeats
])
def test_survivor_of_a_killed_peer_exits_with_one_line(tmp_path, mode, victim, cause):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("VIPER_DEBUG", None)
    port, procs = _free_port(), []
    try:
        for i in range(2):
            with open(tmp_path / f"out{i}", "w") as out, open(tmp_path / f"err{i}", "w") as err:
                procs.append(subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), mode, str(HEARTBEAT_S)],
                                              env=env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True))
        for i in range(2):
            _wait_for(tmp_path / f"out{i}", f"process {i} step 3", procs)
        os.killpg(procs[victim].pid, signal.SIGKILL)  # the supervisor and its JAX child, as a preemption
        procs[victim].wait()
        survivor = procs[1 - victim]
        try:
            survivor.wait(timeout=GUARD_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still runs {GUARD_S} s after its peer's death: it hangs\n"
                        + (tmp_path / f"err{1 - victim}").read_text()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    err = (tmp_path / f"err{1 - victim}").read_text()
    last = err.strip().splitlines()[-1]
    assert survivor.returncode == 1, err[-3000:]
    assert last.startswith(f"worker: process {1 - victim} of 2: another process of this run is gone ("), err[-3000:]
    assert re.search(cause, last) and f"distributed.heartbeat_timeout_s={HEARTBEAT_S}" in last, last
    assert "Traceback" not in err and "Check failure stack trace" not in err, err[-3000:]


# ---------------------------------------------------------------------------------------------- pieces (no JAX run)

CFG = {"coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": 1, "timeout_s": 5, "heartbeat_timeout_s": 7}


def _supervised(tmp_path: Path, code: str) -> tuple[int, str]:
    """peer_loss.supervise over `python -c code`, in a subprocess whose stderr is kept."""
    script = (f"import sys; from viper_jax import peer_loss; "
              f"sys.exit(peer_loss.supervise([sys.executable, '-c', {code!r}], 'viper', {CFG!r}))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("VIPER_DEBUG", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=GUARD_S)
    return done.returncode, done.stderr.decode()  # bytes: text mode would turn a "\r" into a newline


def test_supervise_passes_an_ordinary_end_through(tmp_path):
    status, err = _supervised(tmp_path, "import os, sys; print('viper: bad key', file=sys.stderr); "
                                        "assert os.environ['VIPER_PEER_SUPERVISED'] == '1'; sys.exit(3)")
    assert (status, err) == (3, "viper: bad key\n")
    bar = ("import sys, time; w = sys.stderr.write; w('bar 1/2\\r'); sys.stderr.flush(); time.sleep(0.5); "
           "w('bar 2/2\\r'); sys.stderr.flush(); time.sleep(0.5); w('done')")  # a progress bar, no newline at the end
    assert _supervised(tmp_path, bar) == (0, "bar 1/2\rbar 2/2\rdone")
    status, err = _supervised(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert (status, err) == (128 + signal.SIGTERM, "")


def test_supervise_replaces_the_xla_abort_by_one_line(tmp_path):
    """XLA's abort as the coordinator's death leaves it (lines from the measured run), then SIGABRT."""
    xla = ("E1202 coordination_service_agent.cc:289] Polled an error from coordination service.\n"
           "F1202 client.h:80] Terminating process because the JAX distributed service detected fatal errors. "
           "absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
           "preempted/died/restarted unexpectedly\n*** Check failure stack trace: ***\n    @ 0x7f85 SendToLog()\n")
    status, err = _supervised(tmp_path, f"import os, sys; sys.stderr.write({xla!r}); sys.stderr.flush(); os.abort()")
    lines = err.splitlines()
    assert status == 1 and len(lines) == 2, err
    assert lines[0].startswith("E1202") and "stack trace" not in err and "Terminating" not in err
    assert lines[1].startswith("viper: process 1 of 2: another process of this run is gone (the coordination "
                               "service on process 0 does not answer: process 0 is gone)")
    assert lines[1].endswith("(distributed.heartbeat_timeout_s=7 bounds how long a silent process is waited for)")


def test_supervise_names_a_start_that_timed_out(tmp_path):
    """XLA's abort when a process never came (measured: `initialize` with one of two processes started)."""
    xla = ("F1202 client.h:80] Terminating process because the JAX distributed service detected fatal errors. "
           "absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination.CoordinationService/"
           "RegisterTask\n*** Check failure stack trace: ***\n")
    status, err = _supervised(tmp_path, f"import os, sys; sys.stderr.write({xla!r}); sys.stderr.flush(); os.abort()")
    assert status == 1 and err.splitlines() == [
        "viper: process 1 of 2: not every process of this run reached the coordinator 10.0.0.1:1234 within "
        "distributed.timeout_s=5 s: start the same command on every host (distributed.num_processes of them) and "
        "check the coordinator's address and port"], err


def test_other_errors_pass_through_the_guard():
    """Only a lost peer becomes the one line; outside a multi-process run nothing changes at all."""
    from viper_jax import peer_loss

    with pytest.raises(ValueError, match="Connection closed by peer"):  # not initialised: one process
        with peer_loss.stop_on_peer_loss("viper", CFG):
            raise ValueError("Gloo AllGather failed: Connection closed by peer")
    assert peer_loss.is_peer_loss(ValueError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [::1]:1"))
    assert not peer_loss.is_peer_loss(ValueError("unknown config key 'optim.lr'"))
    # the wordings of a lost peer on GPU (XLA's NCCL status) and TPU (the coordination service), from their
    # sources and reports; a local GPU fault is not one
    nccl = ("INTERNAL: external/xla/xla/service/gpu/runtime/nccl_api.cc:604: NCCL operation ncclAllReduce(...) "
            "failed: remote process exited or there was a network error. Last NCCL warning(error) log entry (may "
            "be unrelated) 'socketProgress: Connection closed by remote peer 10.0.0.2<40012>'.")
    tpu = ("UNAVAILABLE: Task /job:jax_worker/replica:0/task:37 heartbeat timeout. This indicates that the remote "
           "task has failed, got preempted, or crashed unexpectedly.")
    for text in (nccl, nccl.split(". Last")[0], tpu, "UNAVAILABLE: recvmsg: Connection reset by peer"):
        assert peer_loss.is_peer_loss(RuntimeError(text)), text
    assert not peer_loss.is_peer_loss(RuntimeError(
        "INTERNAL: nccl_api.cc:604: NCCL operation ncclAllReduce(...) failed: unhandled cuda error"))
    assert peer_loss.xla_cause("unhealthy (stopped sending heartbeats):\n1\nThe tasks") == (
        "the coordination service had no heartbeat from process 1 within the heartbeat timeout")
    assert peer_loss.several_processes({"num_processes": 2}) and not peer_loss.several_processes({"num_processes": 0})


def test_only_a_multi_process_train_is_supervised(monkeypatch):
    """`viper train` (cli._run_train) trains in its own process unless the config starts several processes,
    and the supervised child (VIPER_PEER_SUPERVISED) always trains itself."""
    from viper_jax import peer_loss

    monkeypatch.delenv(peer_loss.CHILD_ENV, raising=False)
    monkeypatch.delenv("VIPER_NUM_PROCESSES", raising=False)
    config = str(ROOT / "configs" / "tiny.py")
    assert not peer_loss.supervised_train(config, None, [])
    monkeypatch.setenv(peer_loss.CHILD_ENV, "1")
    assert not peer_loss.supervised_train(config, None, ["--config.distributed.num_processes=2"])
    monkeypatch.delenv(peer_loss.CHILD_ENV)
    assert peer_loss.needs_supervisor({"num_processes": 2}) and peer_loss.needs_supervisor({"auto": True})
