"""leak-detector service."""
