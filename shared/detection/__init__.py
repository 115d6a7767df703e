"""Backdoor detectors behind one protocol (`registry.DETECTORS`)."""
