"""The Aurora network in Flax linen."""
