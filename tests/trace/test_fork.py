"""A child forked while its parent is traced."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from textpoke.capture import CaptureOptions, capture_pid

from chaos.harness import Target


@pytest.fixture
def life(build_target):
    target = Target([str(build_target("life")), "2"])
    yield target
    target.kill()


def test_forked_child_records_belong_to_the_child(life):
    """A child forked while traced calls traced functions too (it inherited the patched
    text and shares the ring): its records are kept, and the recording names its
    threads as threads of the child's own process, not of the traced one."""
    stop = threading.Event()
    armed = threading.Event()
    result = {}

    def run() -> None:
        result["recording"] = capture_pid(life.pid, CaptureOptions(functions=("traced",)), stop_event=stop,
                                          on_progress=lambda _: armed.set())

    tracer = threading.Thread(target=run)
    tracer.start()
    try:
        assert armed.wait(60)
        child = int(life.ask("fork").split()[1])
        assert life.readline().startswith("child ready")
        time.sleep(0.3)
    finally:
        stop.set()
        tracer.join(60)
    assert not tracer.is_alive()
    recording = result["recording"]
    owners = {tid: info.pid for tid, info in recording.threads.items()}
    assert set(owners.values()) == {life.pid, child}
    child_tids = {tid for tid, pid in owners.items() if pid == child}
    assert len(child_tids) == 2 and all(os.path.exists(f"/proc/{child}/task/{tid}") for tid in child_tids)
    assert np.isin(recording.records["tid"], list(child_tids)).any()
    os.kill(child, signal.SIGTERM)
    assert "bad=0" in life.readline()
    assert life.stop()["bad"] == 0
