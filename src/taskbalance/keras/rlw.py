"""Random Loss Weighting (RLW); Keras 3 port of :mod:`taskbalance.weighting.rlw`.

Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022. Every step draws fresh weights

    z ~ N(0, I_K),    w = softmax(z),    L = sum_i w_i L_i

from the balancer's seeded Keras generator, whose state is saved with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from taskbalance.keras.base import KerasBalancer, _read, register


@register("rlw", "random")
class RLW(KerasBalancer):
    """RLW (Lin et al., TMLR 2022): ``w = softmax(z)``, ``z ~ N(0, I)`` drawn every step
    from the balancer's seeded Keras generator (its state is saved with the model)."""

    method_name = "rlw"

    def __init__(self, tasks: int | Sequence[str], seed: int = 0, **kw: Any) -> None:
        self.seed = int(seed)
        super().__init__(tasks, **kw)
        self.generator = keras.random.SeedGenerator(self.seed, name="rlw_generator")

    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed}

    _STATE_KEY = "rlw_generator_state"

    def save_own_variables(self, store: Any) -> None:
        """Saves the generator's state too (Keras leaves seed generators out of a
        ``.keras`` file, so a resumed run would repeat the draws)."""
        super().save_own_variables(store)
        store[self._STATE_KEY] = self.generator.state

    def load_own_variables(self, store: Any) -> None:
        keys = [k for k in store.keys() if k != self._STATE_KEY]  # noqa: SIM118 (an H5 store)
        super().load_own_variables({k: store[k] for k in keys})
        self.generator.state.assign(ops.convert_to_tensor(np.asarray(store[self._STATE_KEY])))

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        state = self.generator.state
        before = _read(state) + 0  # a copy: a skipped step draws nothing
        z = keras.random.normal((self.num_tasks,), seed=self.generator, dtype="float32")
        after = _read(state) + 0
        weights = ops.softmax(z)
        updates = [(state, after)]
        state.assign(before)  # put back; applied through `updates` only on a valid step
        return ops.sum(weights * losses), weights, updates
