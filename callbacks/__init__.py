"""Lightning-style callbacks driven by the trainer."""
