"""Carrier-based serving: training, pool, mapper registry, extraction."""
