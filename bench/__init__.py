"""weft's benchmarks (not tests): each module is one command that prints a ratio against a baseline."""
