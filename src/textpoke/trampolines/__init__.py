"""trampolines stage of textpoke (see DEVELOPERS.md): generated code in the target.

- :mod:`.counter`: one ``lock inc`` stub per site (the simplest trampoline);
- :mod:`.tracer`: entry tracer, call-site tracer and per-CPU counters over rseq.
"""
