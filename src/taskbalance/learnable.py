"""Learnable balancer parameters that can never miss an optimizer or get weight decay.

The classic bug with uncertainty weighting (and GradNorm) is to create the learnable
``log sigma^2`` but forget to hand it to the optimizer — the weights then never move — or
to hand it to an optimizer with weight decay (AdamW's default is 0.01), which pulls every
``s_i`` towards 0 and silently biases the weights. :class:`OwnedParameters` rules both out:

* ``optimizer="own"`` (default): the balancer steps its parameters itself with its own
  ``torch.optim.Adam(lr, weight_decay=0)``, right after their gradient is accumulated in
  ``loss.backward()`` (a post-accumulate-grad hook). Nothing to register, nothing to forget.
  Every backward through the balancer's loss is one step of its parameters, except under
  gradient accumulation (``accumulation_steps=N``): the balancer then sets :attr:`hold`
  during the first N-1 micro-batches, the gradients add up in ``.grad``, and the N-th
  backward takes one step with their sum (see ``docs/scaling.md``).
* ``optimizer="external"``: the user calls ``balancer.attach(optimizer)``, which adds the
  parameters as a new param group with ``weight_decay=0``. Using the balancer before
  ``attach`` raises :class:`~taskbalance.errors.BalancerUsageError`, and ``attach`` refuses an
  optimizer that already holds them with a non-zero weight decay.

The opposite mistake is caught too: parameters of ``optimizer="own"`` also given to the
user's optimizer (``Adam([*model.parameters(), *balancer.parameters()])``) would have that
optimizer's lr and weight decay silently ignored (the balancer steps them first and clears
their gradient). The first step of such an optimizer warns once per balancer, with the fix.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from taskbalance.errors import BalancerUsageError, warn

OptimizerMode = Literal["own", "external"]


class OwnedParameters:
    """A named set of learnable tensors and the rule that steps them (see module docs)."""

    def __init__(
        self,
        owner: str,
        params: dict[str, Tensor],
        *,
        optimizer: OptimizerMode = "own",
        lr: float = 1e-3,
        external_allowed: bool = True,
    ) -> None:
        if optimizer not in ("own", "external"):
            raise ValueError(f"optimizer must be 'own' or 'external', got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.owner = owner
        self.mode: OptimizerMode = optimizer
        self.lr = lr
        self.params = {n: nn.Parameter(t.detach().clone().float()) for n, t in params.items()}
        self.attached = False
        #: while true, the post-accumulate-grad hook lets gradients add up instead of stepping.
        self.hold = False
        #: whether the owner can be built with ``optimizer="external"`` (for messages).
        self.external_allowed = external_allowed
        self.warned_foreign = False
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        if optimizer == "own":
            for name, p in self.params.items():
                opt = torch.optim.Adam([p], lr=lr, weight_decay=0.0)
                opt._taskbalance_own = True  # type: ignore[attr-defined]
                self._optimizers[name] = opt
                p.register_post_accumulate_grad_hook(self._make_hook(name))
            _watch(self)

    def _make_hook(self, name: str):
        def hook(param: Tensor) -> None:
            if self.hold:
                return
            opt = self._optimizers[name]
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.params[name]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    # ------------------------------------------------------------------ external mode
    def attach(self, optimizer: torch.optim.Optimizer, lr: float | None = None) -> None:
        """Add the parameters to ``optimizer`` as a param group with ``weight_decay=0``."""
        if self.mode != "external":
            raise BalancerUsageError(
                f"{self.owner} steps its own parameters (optimizer='own'); construct it "
                "with optimizer='external' to attach them to your optimizer instead"
            )
        ours = {id(p) for p in self.params.values()}
        present = False
        for group in optimizer.param_groups:
            if ours & {id(p) for p in group["params"]}:
                present = True
                if group.get("weight_decay", 0.0) != 0.0:
                    raise BalancerUsageError(
                        f"{self.owner}'s parameters are in a param group with weight_decay="
                        f"{group['weight_decay']}; weight decay pulls them to 0 and biases "
                        "the task weights. Remove them from that group and call attach()."
                    )
        if not present:
            optimizer.add_param_group(
                {"params": self.parameters(), "weight_decay": 0.0, "lr": lr or self.lr}
            )
        self.attached = True

    def step_with(self, grads: dict[str, Tensor]) -> None:
        """Apply gradients computed outside autograd (e.g. analytically) to named parameters.

        ``optimizer="own"``: one step of the parameter's own Adam (weight decay 0) with
        exactly ``grad``; the gradient is cleared afterwards. ``optimizer="external"``:
        ``grad`` is added to ``.grad`` for the user's optimizer to apply at its next step.
        Setting ``.grad`` directly does not fire the post-accumulate-grad hook, so this is
        exactly one step, never two.
        """
        for name, grad in grads.items():
            p = self.params[name]
            g = grad.detach().to(device=p.device, dtype=p.dtype)
            if self.mode == "own":
                opt = self._optimizers[name]
                p.grad = g.clone()
                opt.step()
                opt.zero_grad(set_to_none=True)
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    def release(self) -> None:
        """Step (``optimizer="own"``) every parameter whose gradient was held; clear it.

        Closes an accumulated step whose last backward did not reach the parameters (a
        skipped micro-batch, or :meth:`~taskbalance.balancer.Balancer.flush`).
        """
        self.hold = False
        if self.mode != "own":
            return
        for name, p in self.params.items():
            if p.grad is not None:
                opt = self._optimizers[name]
                opt.step()
                opt.zero_grad(set_to_none=True)

    def clear_held(self) -> None:
        """Drop held gradients (``optimizer="own"``) and stop holding (on a state load)."""
        self.hold = False
        if self.mode == "own":
            for p in self.params.values():
                p.grad = None

    def check_ready(self) -> None:
        if self.mode == "external" and not self.attached:
            raise BalancerUsageError(
                f"{self.owner} has learnable parameters that no optimizer steps: call "
                "balancer.attach(optimizer) once (it adds them with weight_decay=0), or "
                "construct the balancer with optimizer='own' to let it step them itself"
            )

    # ------------------------------------------------------------------ device and state
    def to(self, device: torch.device | str) -> None:
        for name, p in self.params.items():
            if p.device == torch.device(device):
                continue
            p.data = p.data.to(device)
            opt = self._optimizers.get(name)
            if opt is not None:
                for st in opt.state.values():
                    for key, value in st.items():
                        if isinstance(value, Tensor) and key != "step":
                            st[key] = value.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizers": {n: opt.state_dict() for n, opt in self._optimizers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in state["params"].items():
                param = self.params[name]
                # equal values are left alone: an in-place copy would bump the version of a
                # tensor that a pending graph may have saved (accumulation restores the
                # state between a micro-batch's forward and its backward)
                if not torch.equal(param, value.to(param.device, param.dtype)):
                    param.copy_(value)
        for name, opt_state in state["optimizers"].items():
            if name in self._optimizers:
                opt = self._optimizers[name]
                opt.load_state_dict(opt_state)
                # state only: the hyper-parameters stay the constructor's (Balancer's rule)
                for group in opt.param_groups:
                    group["lr"], group["weight_decay"] = self.lr, 0.0


# ---------------------------------------------------------------------- foreign optimizers
#: ``optimizer="own"`` parameter sets alive in this process.
_OWN: weakref.WeakSet[OwnedParameters] = weakref.WeakSet()
#: optimizers already checked, with their number of param groups at the time.
_CHECKED: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()
_HOOK: Any = None


def _watch(owned: OwnedParameters) -> None:
    """Start checking the process's optimizer steps for ``owned``'s parameters."""
    global _HOOK
    _OWN.add(owned)
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_check_foreign_step)


def _check_foreign_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer step pre-hook: warn if a user's optimizer holds parameters that a
    balancer steps itself. Each optimizer is looked at once (again if its param groups
    change in number): a dictionary look-up per step after that."""
    if getattr(optimizer, "_taskbalance_own", False) or not _OWN:
        return
    groups = len(optimizer.param_groups)
    if _CHECKED.get(optimizer) == groups:
        return
    _CHECKED[optimizer] = groups
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for owned in list(_OWN):
        names = [n for n, p in owned.params.items() if id(p) in held]
        if not names or owned.warned_foreign:
            continue
        owned.warned_foreign = True
        fix = (
            "construct the balancer with optimizer='external' and call balancer.attach("
            "optimizer) to have your optimizer step them"
            if owned.external_allowed
            else f"{owned.owner} takes no optimizer='external'"
        )
        warn(
            f"{owned.owner}'s learnable parameters {names} are in an optimizer "
            f"({type(optimizer).__name__}) that is not the balancer's, but the balancer "
            "steps them itself (optimizer='own'): that optimizer's lr and weight decay are "
            "ignored for them. "
            f"Build your optimizer from the model's parameters only, or {fix}"
        )
