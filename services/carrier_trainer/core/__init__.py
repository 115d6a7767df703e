"""Carrier training, public models, natural images, the carrier pool and extraction (adversarial
reprogramming)."""
