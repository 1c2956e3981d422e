"""The recipe files, one per table (*.toml); kerasrot/recipes links here, so they ship as `kerasrot.recipes`."""
