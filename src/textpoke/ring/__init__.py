"""ring stage of textpoke (see DEVELOPERS.md): the shared-memory record buffer.

- :mod:`.format`: the ring's header (magic, version, record size) and record dtypes;
- :mod:`.reader`: draining the per-CPU buffers in bulk with numpy, TSC -> ns;
- :mod:`.recording`: :class:`Recording`, its file format and symbolizer;
- :mod:`.capture`: :func:`capture_pid` / :func:`capture_command`, what the CLI calls.
"""

from .capture import CaptureOptions, CaptureProgress, StopReason, capture_command, capture_pid
from .format import RAW_DTYPE, RECORD_DTYPE
from .reader import RingReader, SiteTable, TscClock, decode_into
from .recording import Recording, SiteInfo, Symbols

__all__ = [
    "CaptureOptions",
    "CaptureProgress",
    "RAW_DTYPE",
    "RECORD_DTYPE",
    "Recording",
    "RingReader",
    "SiteInfo",
    "SiteTable",
    "StopReason",
    "Symbols",
    "TscClock",
    "capture_command",
    "capture_pid",
    "decode_into",
]
