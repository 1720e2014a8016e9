"""ring stage of textpoke (see DEVELOPERS.md)."""
