"""model stage of textpoke (see DEVELOPERS.md)."""
