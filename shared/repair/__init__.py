"""Neuron scoring, Shapley values and the repair modes (`registry.REPAIR_MODES`)."""
