"""IMTL-L, the loss-balance half of IMTL; Keras 3 port of the ``"imtl_l"`` method of
:mod:`taskbalance.aggregation.imtl`.

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021. With trainable ``s_i`` (init 0), stepped by the model's optimizer without
weight decay:

    L = sum_i exp(s_i) L_i - s_i,      w_i = exp(s_i)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from taskbalance.keras.base import KerasBalancer, _read, register


@register("imtl_l")
class IMTLL(KerasBalancer):
    """IMTL-L (Liu et al., ICLR 2021): ``sum_i exp(s_i) L_i - s_i`` with trainable ``s``
    (init 0), stepped by the model's optimizer without weight decay."""

    method_name = "imtl_l"

    def __init__(self, tasks: int | Sequence[str], **kw: Any) -> None:
        super().__init__(tasks, **kw)
        self.log_scales = self.add_weight(
            name="log_scales",
            shape=(self.num_tasks,),
            initializer="zeros",
            trainable=True,
            dtype="float32",
        )

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        s = _read(self.log_scales)
        return ops.sum(ops.exp(s) * losses - s), ops.stop_gradient(ops.exp(s)), []

    def evaluation_loss(self, losses: Any) -> Any:
        s = _read(self.log_scales)
        return ops.sum(ops.exp(s) * losses - s)
