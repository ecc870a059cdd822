"""Layer 6, the front: each stage's entry point, recipes, `featx compare`, `featx info` and the command line.
Everything a user types arrives here and leaves as a config for the layers below."""
