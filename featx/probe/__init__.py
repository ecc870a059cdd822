"""Layer 4, stage 2: heads on cached features, many hyperparameters in one pass, and the same probe as
scikit-learn estimators."""

from featx._layout import legacy_names

# featx 0.2 had one module `featx.probe`; its public names still import from here, lazily (nothing heavy at import).
__getattr__ = legacy_names(__name__, "run")
