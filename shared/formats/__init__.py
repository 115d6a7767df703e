"""Model formats behind one protocol (`registry.FORMATS`)."""
