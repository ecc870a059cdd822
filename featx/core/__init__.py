"""Foundations every layer uses: errors and choices, the stage configs, atomic writes, device and precision,
compilation, progress, the output contract, the run directory, statistics and plots.

The stage configs live here, not in the front, because every stage's code takes its config whole."""
