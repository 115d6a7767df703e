"""The result-mapper core: per-user mapper registry (numpy serving path, no I/O)."""
