"""Layer 3, stage 1: the feature store (transfer values in HDF5), extraction, and batches read from it."""

from featx._layout import legacy_names

# featx 0.2 had one module `featx.features`; its public names still import from here, lazily (nothing heavy at import).
__getattr__ = legacy_names(__name__, "store")
