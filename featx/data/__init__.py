"""Layer 1, datasets: the sources featx reads (zip, folder, ImageFolder), downloads, and the decoded-image cache."""

from featx._layout import legacy_names

# featx 0.2 had one module `featx.data`; its public names still import from here, lazily (nothing heavy at import).
__getattr__ = legacy_names(__name__, "cache")
