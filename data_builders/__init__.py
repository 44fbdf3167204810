"""Readers for real ERA5 / IFS HRES files, TFDS builders and the input pipeline."""
