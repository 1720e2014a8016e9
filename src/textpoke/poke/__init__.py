"""poke stage of textpoke (see DEVELOPERS.md)."""
