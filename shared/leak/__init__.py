"""Leak forensics: parameter statistics, calibration, verdict."""
