"""`TrainState`: the one object that is sharded, donated and checkpointed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState"]


@struct.dataclass
class TrainState:
    """Step counter, parameters, optimiser state, RNG and strategy extras.

    `extras` holds strategy-owned device state (a pytree; empty for most strategies) and, under
    `extras["callbacks"]`, callbacks' (`Callback.init_device_state`, e.g. `EMA`'s average). The
    optimiser itself (`tx`) is static: it is rebuilt from the config, never checkpointed.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extras: Any = struct.field(default_factory=dict)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array, extras: Any = None
    ) -> TrainState:
        """The state at step 0.

        Args:
            params: the parameters.
            tx: the optimiser (its state is initialised here).
            rng: a PRNG key for the strategy's randomness.
            extras: strategy-owned device state, default none.

        Returns:
            The new state.
        """
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            extras={} if extras is None else extras,
            tx=tx,
        )

    def apply_gradients(self, grads: Any) -> tuple[TrainState, Any]:
        """One optimiser update.

        Args:
            grads: gradients with the parameters' structure.

        Returns:
            The new state (step advanced) and the update applied (for measurements).
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state), updates
