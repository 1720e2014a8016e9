"""sites stage of textpoke (see DEVELOPERS.md)."""
