"""Test-session settings: a persistent XLA compilation cache.

Many tests compile the same tiny models (every `Trainer` jits its own step); with the cache an
identical program compiles once per machine, which keeps the CPU-only suite within CI's time. It
lives in the per-user cache (`tests.reference.venv.user_cache`), so a second clone on the same
machine starts warm.
"""

from __future__ import annotations

import jax

from tests.reference.venv import user_cache

CACHE = user_cache() / "jax"

jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
