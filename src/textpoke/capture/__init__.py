"""capture stage of textpoke (see DEVELOPERS.md): the orchestration of a trace.

Attach to a process (or start one), select its sites, map trampolines and a
ring, apply one batch, drain the ring into a recording file while the program
runs, restore, detach. What the ``record`` and ``trace`` commands are written
against::

    from textpoke.capture import CaptureOptions, capture_pid
    recording = capture_pid(1234, CaptureOptions(functions=("parse_*",), duration=5), output="run.tpk")

- :mod:`.options`: :class:`CaptureOptions` and their checks;
- :mod:`.select`: which sites, and the names a recording needs;
- :mod:`.drain`: the drain and write threads between the ring and the file;
- :mod:`.quiesce`: when every thread has left the trampolines;
- :mod:`.run`: :func:`capture_pid`, :func:`capture_command`.
"""

from .options import DEFAULT_WAIT_S, CaptureOptions, Overflow
from .run import CaptureProgress, StopReason, capture_command, capture_pid

__all__ = ["CaptureOptions", "CaptureProgress", "DEFAULT_WAIT_S", "Overflow", "StopReason", "capture_command",
           "capture_pid"]
