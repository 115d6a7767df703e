"""ModelGuard's own library: settings, job bus, artifact store, metrics, gRPC runner,
safe model I/O and datasets. Every service imports from here."""
