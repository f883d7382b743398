"""Pipeline stages, one per module: read, generate, score, finalize."""
