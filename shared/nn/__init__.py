"""What every algorithm needs of a torch model: layer sites, probes, masks."""
