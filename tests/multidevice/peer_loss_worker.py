"""One of two `jax.distributed` processes on localhost (gloo), run the way `viper train` runs one
(train/trainer.py run_cli): this command supervises itself as a child (peer_loss.supervise) and the child
works inside peer_loss.stop_on_peer_loss. The work: allgathers in a loop ("collective"), or, after the first
few, none at all ("quiet": the survivor learns of a dead peer from the coordination service's heartbeats
only). Prints "process N step K" after each step, so the test knows both are running before it kills one.

Usage (by tests/test_peer_loss.py): python peer_loss_worker.py PORT PROCESS_ID MODE HEARTBEAT_TIMEOUT_S
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for viper_jax

import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from viper_jax import peer_loss  # noqa: E402


def main(port: int, process_id: int, mode: str, heartbeat_timeout_s: int) -> int:
    cfg = ConfigDict(dict(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=process_id, auto=False,
                          cpu_collectives="gloo", timeout_s=60, heartbeat_timeout_s=heartbeat_timeout_s))
    if peer_loss.needs_supervisor(cfg):
        return peer_loss.supervise([sys.executable, __file__, *sys.argv[1:]], "worker", cfg)
    from viper_jax import distributed  # the child only: the supervisor stays light, as in `viper train`

    with peer_loss.stop_on_peer_loss("worker", cfg):
        distributed.initialize_from_config(cfg)
        for step in range(100_000):  # far longer than the test: it ends by a kill or a lost peer
            if mode == "collective" or step < 3:
                every = distributed.allgather(np.asarray([process_id, step]))
                assert every[:, 1].tolist() == [step, step]
            print(f"process {process_id} step {step}", flush=True)
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
