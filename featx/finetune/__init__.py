"""Layer 4, stage 3: end-to-end training. It may start from a probe run's head, so it sits above probe."""

from featx._layout import legacy_names

# featx 0.2 had one module `featx.finetune`; its public names still import from here, lazily (nothing heavy at import).
__getattr__ = legacy_names(__name__, "run")
