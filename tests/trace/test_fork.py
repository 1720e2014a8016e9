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


def test_forked_child_never_writes_into_the_parents_trace(life):
    """A child forked while traced runs the patched code it inherited, calling traced
    functions in two threads of its own: it computes right, and not one of its calls
    lands in the parent's recording (the session's flag page is wiped in the child),
    while the parent's threads go on being recorded."""
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
    child_tids = {int(t) for t in os.listdir(f"/proc/{child}/task")}
    assert len(child_tids) == 3  # its main thread and two workers
    assert not np.isin(recording.records["tid"], list(child_tids)).any()
    assert {info.pid for info in recording.threads.values()} == {life.pid}
    assert recording.lost == 0 and len(recording.records) > 0
    os.kill(child, signal.SIGTERM)
    made = life.readline()
    assert "bad=0" in made and int(made.split("made=")[1].split()[0]) > 0
    assert life.stop()["bad"] == 0
