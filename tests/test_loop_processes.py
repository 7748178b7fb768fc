"""`viper loop`'s step runner (loop/processes.py): output into the step's log, a failure naming the command and
its last lines, and an interrupt acted on while the child is silent, even when the OS hands it to another thread."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from viper_jax.loop.processes import run_logged
from viper_jax.loop.status import StepFailed


def test_output_goes_to_the_log_and_a_failure_names_its_last_lines(tmp_path):
    log = tmp_path / "logs" / "step.log"
    run_logged([sys.executable, "-c", "print('first'); print('second')"], log, echo=False)
    code = "import sys; [print(f'line {i}') for i in range(20)]; print('10%|#  |'); sys.exit(3)"
    with pytest.raises(StepFailed) as e:
        run_logged([sys.executable, "-c", code], log, echo=False)
    text = log.read_text()
    assert text.count("=== ") == 2 and "first\nsecond\n" in text and "line 19\n10%|#  |" in text
    first, *shown = str(e.value).splitlines()
    assert "exited with status 3" in first and str(log) in first
    assert shown == [f"line {i}" for i in range(5, 20)]  # the last 15 lines, the unfinished bar left out


def test_an_interrupt_delivered_to_another_thread_stops_a_silent_child(tmp_path, monkeypatch):
    """SIGINT raised in a helper thread: Python runs the handler in the main thread at its next bytecode, which a
    read blocked on a silent child would postpone to the child's exit (30 s here)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a test worker may ignore SIGINT
    started = tmp_path / "started"
    code = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(30)"
    children: list[subprocess.Popen] = []
    popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        children.append(popen(*args, **kwargs))
        return children[-1]

    def interrupt_from_this_thread():
        while not started.exists():
            time.sleep(0.05)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    helper = threading.Thread(target=interrupt_from_this_thread, daemon=True)
    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    try:
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            run_logged([sys.executable, "-c", code], tmp_path / "step.log", echo=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert children and children[0].poll() is not None  # terminated before the interrupt propagated
    assert children[0].returncode != 0  # stopped, not a 30 s sleep waited out (that ends with status 0)
