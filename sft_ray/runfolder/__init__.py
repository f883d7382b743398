"""The run folder: its layout, manifest, state, part writer, journal and lock."""
