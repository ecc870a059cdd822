"""Layer 5, scoring: predictions averaged over views, snapshots and runs, submissions, and the report.

`featx predict` is four modules: metrics (top-k, ensembles), scoring (a run's checkpoints on a split),
images (new image files) and writers (what it writes)."""

from featx._layout import legacy_names

# featx 0.2's `featx.predict` module is this package now; its public names still import from here, lazily.
__getattr__ = legacy_names(__name__, "scoring", "metrics", "images", "writers")
