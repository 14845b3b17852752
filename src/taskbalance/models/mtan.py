"""Multi-Task Attention Network (MTAN), small convolutional version.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019. A shared
backbone of ``J`` blocks; block ``j`` computes ``u_j = conv(input)`` and
``p_j = conv(u_j)`` (3x3 conv, batch norm, ReLU), then 2x2 max pooling feeds the next
block. Each task ``i`` has an attention module per block producing a soft mask
``a_ij = h_ij(g_ij([u_j ; f_j(â_i,j-1)]))`` in (0, 1) (``g``: 1x1 conv, BN, ReLU; ``h``:
1x1 conv, BN, sigmoid; no ``f`` term at the first block) and the task feature
``â_ij = a_ij ⊙ p_j``. ``f_j`` (3x3 conv, BN, ReLU, then 2x2 max pooling) carries
``â_i,j-1`` to block ``j``'s width and resolution; the paper writes it without a task
index, i.e. shared by the tasks (``share_f=True``, default). Each task head: global
average pooling of ``â_iJ`` and a linear layer.

Shapes: input ``(B, in_channels, H, W)``, ``H, W >= 2^(J-1)`` (e.g. 28x28 or 32x32 with
``J = 3``); ``u_j``, ``p_j`` and the masks ``a_ij`` are ``(B, channels[j-1], H_j, W_j)``
with ``H_1 = H``, ``H_j+1 = floor(H_j / 2)``; output ``{task: (B, out_features[task])}``.

What is shared: the backbone (and the ``f`` convs when ``share_f``). The attention modules
read the backbone at every block, so the shared representation is all of
``backbone(x) = [u_1, p_1, ..., u_J, p_J]``; as these are nested (``u_2`` depends on
``p_1``), ``features(x)`` packs them into one flat ``(B, F)`` tensor, which gradient
methods can differentiate against without counting a path twice, and ``heads(z, x)``
unpacks it (``x`` gives the spatial size). With ``share_f=True`` the ``f`` convs sit after
the features and serve every task, so ``features=`` is refused by the gradient engine:
build with ``share_f=False`` (one ``f`` per task) for it, or use
``shared=model.shared_parameters()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from taskbalance.balancer import Tasks
from taskbalance.models._layers import OutFeatures, module_params, out_sizes


def conv_bn(cin: int, cout: int, k: int, act: nn.Module) -> nn.Sequential:
    """``k x k`` convolution (same padding, no bias), batch norm, activation."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), act
    )


class MTAN(nn.Module):
    """MTAN over a small ``len(channels)``-block conv backbone.

    Args:
        in_channels: input image channels.
        tasks: number of tasks or their names.
        channels: width of each backbone block.
        out_features: output width (e.g. classes), for all tasks or per task name.
        share_f: share the attention modules' 3x3 ``f`` convs across tasks (paper).
    """

    def __init__(
        self,
        in_channels: int,
        tasks: Tasks,
        channels: Sequence[int] = (16, 32, 64),
        out_features: OutFeatures = 10,
        share_f: bool = True,
    ) -> None:
        super().__init__()
        sizes = out_sizes(tasks, out_features)
        self.tasks: tuple[str, ...] = tuple(sizes)
        self.share_f = share_f
        widths = [in_channels, *channels]
        self.enc_u = nn.ModuleList(
            conv_bn(widths[j], widths[j + 1], 3, nn.ReLU()) for j in range(len(channels))
        )
        self.enc_p = nn.ModuleList(conv_bn(c, c, 3, nn.ReLU()) for c in channels)
        self.pool = nn.MaxPool2d(2)

        def f_convs() -> nn.ModuleList:
            return nn.ModuleList(
                conv_bn(channels[j - 1], channels[j], 3, nn.ReLU()) for j in range(1, len(channels))
            )

        self.f = f_convs() if share_f else nn.ModuleDict({t: f_convs() for t in self.tasks})
        self.attention = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    nn.Sequential(
                        conv_bn(c if j == 0 else 2 * c, c, 1, nn.ReLU()),
                        conv_bn(c, c, 1, nn.Sigmoid()),
                    )
                    for j, c in enumerate(channels)
                )
                for t in self.tasks
            }
        )
        self.task_heads = nn.ModuleDict({t: nn.Linear(channels[-1], n) for t, n in sizes.items()})

    def _f(self, task: str) -> nn.ModuleList:
        return self.f if self.share_f else self.f[task]  # type: ignore[return-value,index]

    def backbone(self, x: Tensor) -> list[Tensor]:
        """Backbone tensors ``[u_1, p_1, ..., u_J, p_J]``."""
        out: list[Tensor] = []
        h = x
        for j, (conv_u, conv_p) in enumerate(zip(self.enc_u, self.enc_p)):
            u = conv_u(h if j == 0 else self.pool(h))
            h = conv_p(u)
            out += [u, h]
        return out

    def _branch(self, task: str, z: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        masks: list[Tensor] = []
        feat = z[0]
        for j, att in enumerate(self.attention[task]):
            u, p = z[2 * j], z[2 * j + 1]
            a = att(u) if j == 0 else att(torch.cat([u, self.pool(self._f(task)[j - 1](feat))], 1))
            masks.append(a)
            feat = a * p
        return feat, masks

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """``{task: [a_1, ..., a_J]}``, each mask in (0, 1)."""
        z = self.backbone(x)
        return {t: self._branch(t, z)[1] for t in self.tasks}

    def task_outputs(self, z: Sequence[Tensor]) -> dict[str, Tensor]:
        """Task outputs from the backbone tensors of :meth:`backbone`."""
        return {t: self.task_heads[t](self._branch(t, z)[0].mean(dim=(2, 3))) for t in self.tasks}

    def features(self, x: Tensor) -> Tensor:
        """The backbone tensors flattened into one ``(B, F)`` tensor (see the module doc)."""
        return torch.cat([t.flatten(1) for t in self.backbone(x)], 1)

    def heads(self, z: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Task outputs from :meth:`features`; ``x`` gives the spatial size to unflatten."""
        shapes, (h, w) = [], x.shape[-2:]
        for j, c in enumerate(self.enc_p):
            h, w = (h, w) if j == 0 else (h // 2, w // 2)
            shapes += [(c[0].out_channels, h, w)] * 2
        parts = z.split([c * h * w for c, h, w in shapes], dim=1)
        return self.task_outputs([t.view(-1, *s) for t, s in zip(parts, shapes)])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.task_outputs(self.backbone(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone (and the ``f`` convs when they are shared)."""
        if self.share_f:
            return module_params(self.enc_u, self.enc_p, self.f)
        return module_params(self.enc_u, self.enc_p)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Task ``task``'s attention modules and head (and its ``f`` convs if not shared)."""
        own = [self.attention[task], self.task_heads[task]]
        if not self.share_f:
            own.append(self.f[task])  # type: ignore[index]
        return module_params(*own)
