"""A dying peer in a multi-process run (`viper train` over several `jax.distributed` processes): every
survivor stops with one line naming it and exit status 1, within `distributed.heartbeat_timeout_s`, instead of
hanging in JAX's shutdown barrier or dying in an XLA abort with a C++ stack trace.

How a peer's death reaches a survivor (jax 0.10.2; measured on CPU with gloo, docs/reliability.md):
- a collective in flight or the next one fails at once (gloo: "Connection closed by peer"): a Python
  exception in the main thread. `stop_on_peer_loss` turns it into the one line and leaves with `os._exit`:
  the normal exit would wait in jax.distributed's shutdown barrier, which cannot succeed with a peer gone,
  until the heartbeat timeout, and then abort.
- the coordinator (process 0) dies: the others' coordination agents lose it at once. Another process dies
  while process 0 runs no collective (compiling, writing a checkpoint): the coordination service notices the
  missing heartbeats after heartbeat_timeout_s. Both end inside XLA: LOG(FATAL) "Terminating process because
  the JAX distributed service detected fatal errors", SIGABRT, a C++ stack trace. No Python runs there (the
  `missed_heartbeat_callback` jaxlib's client accepts fails with std::bad_cast when called: no caster for the
  status it passes), so `supervise` runs the command as a child process and reports that end from outside.
  The same abort ends a start at which a process never registers within distributed.timeout_s: its own line.

The child stays in the supervisor's process group, so a kill of the group (a preemption, the crash sweep, the
tests) takes both; the child also dies when the supervisor alone is SIGKILLed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import traceback
from typing import Any, Iterator, Sequence

CHILD_ENV = "VIPER_PEER_SUPERVISED"  # set in the supervised child: it runs the command itself
XLA_FATAL = "JAX distributed service detected fatal errors"  # XLA's client.h LOG(FATAL) on a lost peer
EXIT_STATUS = 1  # as every other error of the command lines (viper_common/cli_errors.py)

# What a collective or the coordination client raises when another process is gone, matched in the error's
# text: XLA raises them as ValueError / JaxRuntimeError with the backend's message, no type of their own.
# - gloo (CPU, measured here): "Gloo AllGather failed: Connection closed by peer".
# - NCCL under XLA (GPU; XLA's ToStatus and NCCL's ncclGetErrorString, read in their sources): "NCCL operation
#   ncclAllReduce(...) failed: remote process exited or there was a network error. Last NCCL warning(error) log
#   entry (may be unrelated) 'socketProgress: Connection closed by remote peer ...'". A local device fault
#   ("unhandled cuda error") is not a lost peer and is left as it is.
# - the coordination service (TPU and GPU alike): "UNAVAILABLE: Task /job:jax_worker/replica:0/task:3 heartbeat
#   timeout. This indicates that the remote task has failed, got preempted, or crashed unexpectedly", and the
#   gRPC transport's "UNAVAILABLE: Socket closed" or "recvmsg: Connection reset by peer".
_PEER_GONE = re.compile(r"closed by (remote )?peer|reset by peer|Broken pipe|Socket closed|heartbeat|"
                        r"coordination service|NCCL error|remote process exited|peer process|DEADLINE_EXCEEDED",
                        re.IGNORECASE)


def several_processes(cfg: Any) -> bool:
    """Whether the `distributed` ConfigDict (or the VIPER_* environment) starts more than one process."""
    count = int(cfg.get("num_processes") or os.environ.get("VIPER_NUM_PROCESSES") or 1)
    return bool(cfg.get("auto", False)) or count > 1


def needs_supervisor(cfg: Any) -> bool:
    """True in the command the user started for a multi-process run; False in its supervised child."""
    return several_processes(cfg) and not os.environ.get(CHILD_ENV)


def message(where: str, cause: str, heartbeat_timeout_s: int) -> str:
    """The one line (without the program's name) a survivor prints."""
    return (f"{where}: another process of this run is gone ({cause}); it died, was preempted or hangs, so this "
            f"process stops too. Rerun the same command on every host: it resumes from the last checkpoint "
            f"(distributed.heartbeat_timeout_s={heartbeat_timeout_s} bounds how long a silent process is waited for)")


def start_message(where: str, cfg: Any) -> str:
    """The one line for a start that timed out: not every process registered with the coordinator."""
    return (f"{where}: not every process of this run reached the coordinator "
            f"{cfg.get('coordinator') or os.environ.get('VIPER_COORDINATOR') or '(auto-detected)'} within "
            f"distributed.timeout_s={int(cfg.get('timeout_s', 300))} s: start the same command on every host "
            f"(distributed.num_processes of them) and check the coordinator's address and port")


def is_peer_loss(error: BaseException) -> bool:
    return bool(_PEER_GONE.search(str(error)))


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _where(cfg: Any) -> str:
    """"process I of N" from the config or the VIPER_* environment; "this process" when JAX detects them."""
    pid = cfg.get("process_id", -1)
    pid = pid if pid is not None and pid >= 0 else os.environ.get("VIPER_PROCESS_ID")
    count = cfg.get("num_processes") or os.environ.get("VIPER_NUM_PROCESSES")
    return "this process" if pid is None or not count else f"process {pid} of {count}"


@contextlib.contextmanager
def stop_on_peer_loss(prog: str, cfg: Any) -> Iterator[None]:
    """Inside a multi-process run: an error that says another process is gone becomes `prog: <one line>`
    on stderr and an immediate exit with EXIT_STATUS (no shutdown barrier: it could only time out). Other
    errors pass unchanged; VIPER_DEBUG (--debug) prints the traceback before the line."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a lost peer
        import jax

        if not (jax.distributed.is_initialized() and is_peer_loss(e)):
            raise
        from viper_common.cli_errors import debugging

        if debugging():
            traceback.print_exc()
        cause = f"{type(e).__name__}: {_short(str(e))}"
        where = _where(cfg)  # from the config first: asking JAX could start a backend that waits for the dead peer
        if where == "this process" and jax.process_count() > 1:  # auto-detected ids (Cloud TPU, Slurm)
            where = f"process {jax.process_index()} of {jax.process_count()}"
        _leave(f"{prog}: {message(where, cause, int(cfg.get('heartbeat_timeout_s', 100)))}")


def _leave(line: str) -> None:
    import logging

    logging.shutdown()  # flush the log handlers: os._exit runs no atexit
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the supervisor dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def xla_cause(text: str) -> str:
    """A short cause from XLA's fatal message (and the coordination service's lines before it)."""
    gone = re.search(r"stopped sending heartbeats\):\s*([\d\s,]+)", text) or re.search(r"Task (\d+) heartbeat timeout",
                                                                                        text)
    if gone:
        ids = ", ".join(gone.group(1).replace(",", " ").split())
        return f"the coordination service had no heartbeat from process {ids} within the heartbeat timeout"
    if re.search(r"Failed to send RPC to coordination service|leader task", text):
        return "the coordination service on process 0 does not answer: process 0 is gone"
    status = text.split("absl::Status:", 1)[-1]
    return f"the JAX distributed runtime stopped: {_short(status, 200)}"


def supervised_train(config_path: str, workdir: str | None, overrides: Sequence[str]) -> bool:
    """`viper train` of a multi-process run, in the process the user started: runs the same command line as a
    supervised child and returns True once it ended well (raises SystemExit with its status otherwise); False
    for a one-process run or in the child, which then trains itself. Before the trainer's imports: this
    process stays small (no JAX)."""
    from viper_common.cli_errors import debugging
    from viper_jax.train.config import apply_overrides, load_config

    config = load_config(config_path)
    apply_overrides(config, list(overrides))
    if not needs_supervisor(config.distributed):
        return False
    command = [sys.executable, "-m", "viper_jax", *(["--debug"] if debugging() else []), "train", "--config",
               config_path, *(["--workdir", workdir] if workdir else []), *overrides]
    status = supervise(command, "viper", config.distributed)
    if status:
        raise SystemExit(status)
    return True


def supervise(command: Sequence[str], prog: str, cfg: Any) -> int:
    """Runs `command` (this same command line) as a child with CHILD_ENV set, its stderr passed through;
    when XLA aborts it over a lost peer, prints `prog: <one line>` instead of XLA's stack trace and returns
    EXIT_STATUS. Otherwise returns the child's status (128 + N for a signal N, as a shell does)."""
    from viper_common.cli_errors import debugging

    child = subprocess.Popen(list(command), env=dict(os.environ, **{CHILD_ENV: "1"}), stderr=subprocess.PIPE,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    # Ctrl-C reaches the child directly (same process group); a SIGTERM/SIGHUP sent to this process only
    # (a scheduler, `kill PID`) is passed on, so the child stops as it would unsupervised.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _frame: child.send_signal(s))
    try:
        return _watch(child, prog, cfg, debugging())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(child: subprocess.Popen, prog: str, cfg: Any, debug: bool) -> int:
    """Relays the child's stderr as it comes (a progress bar's \\r updates included) until XLA's abort,
    which is held back (shown with --debug); then the child's status or the one line."""
    assert child.stderr is not None
    fd, out, marker = child.stderr.fileno(), sys.stderr.buffer, XLA_FATAL.encode()
    held = bytearray()  # the unfinished last line: it may be the start of XLA's abort
    before = bytearray()  # the last bytes relayed (the coordination service's error lines name the process)
    fatal = bytearray()  # XLA's abort and everything after it

    def relay(data: bytes) -> None:
        if not data:
            return
        if not fatal and marker in data:
            start = data.rfind(b"\n", 0, data.index(marker)) + 1  # from the start of XLA's line on
            relay(data[:start])
            fatal.extend(data[start:])
            if debug:
                out.write(data[start:])
        elif fatal:
            fatal.extend(data)
            if debug:
                out.write(data)
        else:
            out.write(data)
            before.extend(data)
            del before[:-8192]
        out.flush()

    while True:
        ready = select.select([fd], [], [], 0.2)[0]
        chunk = os.read(fd, 65536) if ready else None
        if chunk == b"":  # the child closed its stderr: it ended
            relay(bytes(held))
            break
        held.extend(chunk or b"")
        # Complete lines go on at once; the unfinished rest when nothing more came for 0.2 s (a progress bar).
        cut = len(held) if chunk is None else max(held.rfind(b"\n"), held.rfind(b"\r")) + 1
        relay(bytes(held[:cut]))
        del held[:cut]
    status = child.wait()
    if fatal:
        text = (bytes(before[-4096:]) + bytes(fatal[:8192])).decode(errors="replace")
        if b"RegisterTask" in fatal[:8192]:  # the start timed out: no peer was lost, one never came
            line = start_message(_where(cfg), cfg)
        else:
            line = message(_where(cfg), xla_cause(text), int(cfg.get("heartbeat_timeout_s", 100)))
        print(f"{prog}: {line}", file=sys.stderr, flush=True)
        return EXIT_STATUS
    return status if status >= 0 else 128 - status
