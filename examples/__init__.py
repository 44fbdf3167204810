"""Examples of extending the framework without editing library code."""
