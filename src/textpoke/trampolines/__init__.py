"""trampolines stage of textpoke (see DEVELOPERS.md)."""
