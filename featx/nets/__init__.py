"""Layer 2, networks and what they see: backbones, the small from-scratch nets, views and augmentation,
classifier heads and their optimizers, and the models stage 3 trains."""
