"""pruning-orchestrator: owns audit jobs, runs the repair, writes the report."""
