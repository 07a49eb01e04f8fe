"""timecma.runtime: torch-free serving of a timecma bundle."""
