"""neuron-scoring service."""
