"""ring stage of textpoke (see DEVELOPERS.md): the record buffer, its reader, the file.

- :mod:`.format`: the ring's header (magic, version, record size) and record dtypes;
- :mod:`.reader`: draining the per-CPU buffers in bulk with numpy, decoding, TSC -> ns;
- :mod:`.file`: the chunked recording file, written while tracing and read chunk by chunk;
- :mod:`.recording`: :class:`Recording`, its sites, symbols and threads.

The orchestration of a trace (attach, select, batch, drain, write) is the
capture stage, :mod:`textpoke.capture`.
"""

from .format import RAW_DTYPE, RECORD_DTYPE, RecordKind
from .reader import RingReader, SiteTable, TscClock, decode
from .recording import Recording, SiteInfo, Symbols, ThreadInfo

__all__ = [
    "RAW_DTYPE",
    "RECORD_DTYPE",
    "RecordKind",
    "Recording",
    "RingReader",
    "SiteInfo",
    "SiteTable",
    "Symbols",
    "ThreadInfo",
    "TscClock",
    "decode",
]
