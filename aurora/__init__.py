"""Aurora in Flax: the model only, no training code."""
