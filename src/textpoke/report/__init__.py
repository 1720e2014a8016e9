"""report stage of textpoke (see DEVELOPERS.md)."""
