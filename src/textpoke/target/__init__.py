"""target stage of textpoke (see DEVELOPERS.md)."""
