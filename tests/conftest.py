"""Test-session settings: a persistent XLA compilation cache.

Many tests compile the same tiny models (every `Trainer` jits its own step); with the cache an
identical program compiles once per machine, which keeps the CPU-only suite within CI's time.
"""

from __future__ import annotations

from pathlib import Path

import jax

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "jax"

jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
