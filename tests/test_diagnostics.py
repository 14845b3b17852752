"""Gradient diagnostics: the pure functions (hand-computed cases, an explicit per-task loop),
their recording by the gradient methods (``diagnostics=``), the history/CSV/checkpoint
round trip, the misuse checks and the figure."""

from __future__ import annotations

import csv
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import taskbalance as tb
from conftest import TinyNet, batch, memory_logger, save_load, task_losses
from taskbalance import diagnostics as dg
from taskbalance.errors import BalancerUsageError

SQ5 = math.sqrt(5.0)


def gram_of(*rows: list[float]) -> torch.Tensor:
    jac = torch.tensor(rows, dtype=torch.float64)
    return jac @ jac.T


# ---------------------------------------------------------------- hand-computed cases
def test_orthogonal_gradients() -> None:
    g = gram_of([1.0, 0.0], [0.0, 2.0])
    assert torch.equal(dg.cosine_matrix(g), torch.eye(2, dtype=torch.float64))
    assert dg.gradient_norms(g).tolist() == [1.0, 2.0]
    assert float(dg.norm_ratio(g)) == 2.0
    assert float(dg.conflict_fraction(g)) == 0.0
    # d = g1 + g2 = (1, 2): g1·d = 1, g2·d = 4, ||d|| = sqrt(5)
    align = dg.alignment(g, torch.tensor([1.0, 1.0]))
    assert align.tolist() == pytest.approx([1.0 / SQ5, 2.0 / SQ5], abs=1e-15)


def test_identical_gradients() -> None:
    g = gram_of([3.0, 4.0], [3.0, 4.0])
    assert dg.cosine_matrix(g).reshape(-1).tolist() == pytest.approx([1.0] * 4, abs=1e-15)
    assert float(dg.norm_ratio(g)) == 1.0
    assert float(dg.conflict_fraction(g)) == 0.0
    assert dg.alignment(g, torch.tensor([0.3, 0.7])).tolist() == pytest.approx([1.0, 1.0])


def test_opposite_gradients() -> None:
    g = gram_of([1.0, -2.0], [-1.0, 2.0])
    assert dg.cosine_matrix(g)[0, 1].item() == pytest.approx(-1.0, abs=1e-15)
    assert float(dg.conflict_fraction(g)) == 1.0
    # equal weights cancel: d = 0, every alignment is 0 by definition (no NaN)
    assert dg.alignment(g, torch.tensor([1.0, 1.0])).tolist() == [0.0, 0.0]
    # w = (2, 1): d = g1 - ... = (1, -2) = g1: aligned with g1, opposed to g2
    assert dg.alignment(g, torch.tensor([2.0, 1.0])).tolist() == pytest.approx([1.0, -1.0])


def test_scaled_gradients() -> None:
    g = gram_of([1.0, 1.0], [3.0, 3.0], [-0.5, -0.5])
    cos = dg.cosine_matrix(g)
    expected = [1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
    assert cos.reshape(-1).tolist() == pytest.approx(expected, abs=1e-15)
    assert float(dg.norm_ratio(g)) == pytest.approx(6.0)  # 3√2 / (√2 / 2)
    assert float(dg.conflict_fraction(g)) == pytest.approx(2.0 / 3.0)
    assert dg.upper_pairs(cos).tolist() == pytest.approx([1.0, -1.0, -1.0], abs=1e-15)
    assert dg.pair_labels(["a", "b", "c"]) == ["a-b", "a-c", "b-c"]


def test_zero_gradients_are_left_out_without_nan() -> None:
    g = gram_of([0.0, 0.0], [1.0, 0.0], [-2.0, 0.0])
    cos = dg.cosine_matrix(g)
    assert cos[0].tolist() == [0.0, 0.0, 0.0] and cos[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert cos[1, 2].item() == -1.0
    assert float(dg.norm_ratio(g)) == 2.0  # among the non-zero gradients
    assert float(dg.conflict_fraction(g)) == 1.0  # the one pair of non-zero gradients
    assert dg.alignment(g, torch.tensor([5.0, 1.0, 0.0])).tolist() == [0.0, 1.0, -1.0]
    one = gram_of([0.0, 0.0], [1.0, 1.0])
    assert float(dg.norm_ratio(one)) == 1.0 and float(dg.conflict_fraction(one)) == 0.0
    none = torch.zeros(3, 3, dtype=torch.float64)
    values = dg.step_diagnostics(none, torch.ones(3))
    assert all(bool(torch.isfinite(v).all()) for v in values.values())
    assert float(values["diag/norm_ratio"]) == 1.0
    assert values["diag/align"].tolist() == [0.0, 0.0, 0.0]


def test_rounding_is_clamped() -> None:
    g = torch.tensor([[1.0, 1.0 + 1e-12], [1.0 + 1e-12, 1.0]], dtype=torch.float64)
    assert float(dg.cosine_matrix(g).max()) == 1.0
    neg = torch.tensor([[-1e-30, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert dg.gradient_norms(neg).tolist() == [0.0, 1.0]


def test_loss_ratios() -> None:
    ratios = dg.loss_ratios(torch.tensor([2.0, 3.0, 0.0, 0.5]), torch.tensor([4.0, 3.0, 0.0, 0.0]))
    assert ratios.tolist() == [0.5, 1.0, 1.0, math.inf]
    with pytest.raises(ValueError, match="expected 2 initial losses"):
        dg.loss_ratios(torch.ones(2), torch.ones(3))


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="square"):
        dg.cosine_matrix(torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected 2 weights"):
        dg.alignment(torch.eye(2), torch.ones(3))
    with pytest.raises(ValueError, match="give the weights"):
        dg.step_diagnostics(torch.eye(2))


# ---------------------------------------------------------------- against an explicit loop
def loop_diagnostics(grads: list[torch.Tensor], direction: torch.Tensor) -> dict[str, Any]:
    """The diagnostics from per-task gradient vectors, one pair at a time."""
    k = len(grads)
    norms = [float(g.norm()) for g in grads]
    cos = {}
    for i in range(k):
        for j in range(i + 1, k):
            cos[(i, j)] = float(torch.dot(grads[i], grads[j])) / (norms[i] * norms[j])
    d_norm = float(direction.norm())
    return {
        "cos": [cos[p] for p in sorted(cos)],
        "norm": norms,
        "norm_ratio": max(norms) / min(norms),
        "conflict": sum(c < 0 for c in cos.values()) / len(cos),
        "align": [float(torch.dot(g, direction)) / (n * d_norm) for g, n in zip(grads, norms)],
    }


def assert_matches_loop(
    values: dict[str, torch.Tensor], loop: dict[str, Any], rel: float = 1e-9
) -> None:
    """``rel``: 1e-9 for float64 inputs; a float32 model's J rounds at about 1e-7."""
    tol = {"rel": rel, "abs": 1e-6 * rel}
    assert values["diag/cos"].reshape(-1).tolist() == pytest.approx(loop["cos"], **tol)
    assert values["diag/norm"].reshape(-1).tolist() == pytest.approx(loop["norm"], **tol)
    assert float(values["diag/norm_ratio"]) == pytest.approx(loop["norm_ratio"], **tol)
    assert float(values["diag/conflict_fraction"]) == pytest.approx(loop["conflict"], **tol)
    assert values["diag/align"].reshape(-1).tolist() == pytest.approx(loop["align"], **tol)


@pytest.mark.parametrize("seed", range(5))
def test_pure_functions_agree_with_a_loop_on_random_jacobians(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k, p = 2 + seed, 7
    jac = torch.randn(k, p, generator=gen, dtype=torch.float64) * torch.rand(k, 1, generator=gen)
    w = torch.randn(k, generator=gen, dtype=torch.float64)
    values = dg.step_diagnostics(jac @ jac.T, w)
    assert_matches_loop(values, loop_diagnostics(list(jac), w @ jac))
    # the same through J d and ||d|| (the form used for Jacobian methods)
    d = torch.randn(p, generator=gen, dtype=torch.float64)
    other = dg.step_diagnostics(jac @ jac.T, task_dot_update=jac @ d, update_norm=d.norm())
    assert_matches_loop(other, loop_diagnostics(list(jac), d))


def task_gradient_vectors(losses: list[torch.Tensor], inputs: list[torch.Tensor]) -> list:
    out = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        flat = [
            torch.zeros_like(x).reshape(-1) if g is None else g.reshape(-1)
            for g, x in zip(grads, inputs)
        ]
        out.append(torch.cat(flat).double())
    return out


def last_row(history: tb.History) -> dict[str, torch.Tensor]:
    return {name: history.extra(name)[-1] for name in history.extra_names}


@pytest.mark.parametrize("method", ["mgda", "upgrad", "cagrad"])
@pytest.mark.parametrize("mode", ["exact", "features"])
def test_recorded_diagnostics_match_a_per_task_loop(method: str, mode: str) -> None:
    model = TinyNet()
    bal = tb.make(method, tasks=["a", "b", "c"], diagnostics=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        x, _ = batch(step)
        z = torch.tanh(model.shared(x))
        losses = task_losses_from(model, z, step)
        inputs = list(model.shared.parameters()) if mode == "exact" else [z]
        grads = task_gradient_vectors(losses, inputs)
        if mode == "exact":
            bal.backward(losses, shared=model.shared)
        else:
            bal.backward(losses, features=z)
        w = bal.last_weights.double()
        direction = sum(wi * g for wi, g in zip(w, grads))
        assert_matches_loop(last_row(bal.history), loop_diagnostics(grads, direction), 1e-5)
        opt.step()


def task_losses_from(model: TinyNet, z: torch.Tensor, step: int) -> list[torch.Tensor]:
    _, targets = batch(step)
    return [((head(z).squeeze(-1) - y) ** 2).mean() for head, y in zip(model.heads, targets)]


def test_jacobian_method_alignment_uses_its_own_direction() -> None:
    """GradDrop's update is not wᵀJ: the alignment is with the direction it wrote."""
    model = TinyNet()
    bal = tb.make("graddrop", tasks=3, diagnostics=True, seed=1)
    params = list(model.shared.parameters())
    losses = task_losses(model, 0)
    grads = task_gradient_vectors(losses, params)
    bal.backward(losses, shared=params)
    written = torch.cat([p.grad.reshape(-1) for p in params]).double()
    assert_matches_loop(last_row(bal.history), loop_diagnostics(grads, written), 1e-5)


def test_loss_ratios_are_against_the_first_step() -> None:
    model = TinyNet()
    bal = tb.make("mgda", tasks=3, diagnostics=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        bal.backward(task_losses(model, step), shared=model.shared)
        opt.step()
    losses = bal.history.losses
    ratios = bal.history.extra("diag/loss_ratio")
    assert torch.allclose(ratios, losses / losses[0], rtol=1e-12, atol=0)
    assert bal.last_diagnostics is not None
    assert float(bal.last_diagnostics["diag/loss_ratio/2"]) == pytest.approx(
        float(losses[2, 2] / losses[0, 2]), rel=1e-12
    )


@pytest.mark.parametrize("path", ["balanced_loss", "amp_backward"])
def test_loss_method_diagnosed_with_a_backward_of_its_own(path: str) -> None:
    """balanced_loss (and amp_backward with a GradScaler, which uses it) records the same
    diagnostics as a per-task loop, and the combined loss is balancer(losses)'s."""
    from taskbalance.integrations import amp_backward

    model = TinyNet()
    bal = tb.make("uncertainty", tasks=3, diagnostics=True)
    losses = task_losses(model, 0)
    params = list(model.shared.parameters())
    grads = task_gradient_vectors(losses, params)
    if path == "balanced_loss":
        total = bal.balanced_loss(losses, shared=model.shared)
        assert total is not None
        total.backward()
    else:
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "called without shared=" warning
            amp_backward(bal, losses, scaler=scaler, shared=model.shared)
    w = bal.last_weights.double()
    direction = sum(wi * g for wi, g in zip(w, grads))
    assert_matches_loop(last_row(bal.history), loop_diagnostics(grads, direction), 1e-5)
    written = torch.cat([p.grad.reshape(-1) for p in params]).double()
    scale = 1.0 if path == "balanced_loss" else 8.0
    torch.testing.assert_close(written, scale * direction, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- sampling, off, accumulation
def run(bal: tb.Balancer, steps: int, start: int = 0, model: TinyNet | None = None) -> TinyNet:
    model = model or TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(start, start + steps):
        opt.zero_grad()
        bal.backward(task_losses(model, step), shared=model.shared)
        opt.step()
    return model


def test_every_nth_step_leaves_nan_rows() -> None:
    bal = tb.make("upgrad", tasks=3, diagnostics=3)
    run(bal, 5)
    ratio = bal.history.extra("diag/norm_ratio")[:, 0]
    assert [not math.isnan(v) for v in ratio.tolist()] == [True, False, False, True, False]
    # the diagnosed rows equal those of diagnostics=True on the same run
    every = tb.make("upgrad", tasks=3, diagnostics=True)
    run(every, 5)
    for name in every.history.extra_names:
        assert torch.equal(bal.history.extra(name)[[0, 3]], every.history.extra(name)[[0, 3]])


def test_off_computes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import taskbalance.aggregation.base as base

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("diagnostics computed while off")

    monkeypatch.setattr(base, "step_diagnostics", refuse)
    for name in ("mgda", "graddrop"):
        bal = tb.make(name, tasks=3)
        run(bal, 2)
        assert not any(n.startswith("diag/") for n in bal.history.header())
        assert bal._diag_gram is None and bal.last_diagnostics is None


def test_accumulated_step_records_the_mean_of_its_micro_batches() -> None:
    """Two identical micro-batches: the row is that of one unaccumulated step."""
    model_a, model_b = TinyNet(), TinyNet()
    acc = tb.make("mgda", tasks=3, diagnostics=True, accumulation_steps=2)
    one = tb.make("mgda", tasks=3, diagnostics=True)
    for _ in range(2):
        acc.backward(task_losses(model_a, 0), shared=model_a.shared)
    one.backward(task_losses(model_b, 0), shared=model_b.shared)
    assert len(acc.history) == 1
    for name in one.history.extra_names:
        assert torch.allclose(acc.history.extra(name), one.history.extra(name), atol=1e-12)


# ---------------------------------------------------------------- history, CSV, checkpoint
def test_csv_carries_the_diagnostics(tmp_path: Any) -> None:
    bal = tb.make("mgda", tasks=["x", "y"], diagnostics=2)
    streamed = bal.history.stream_to(tmp_path / "stream.csv")
    model = TinyNet(num_tasks=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        bal.backward(task_losses(model, step), shared=model.shared)
        opt.step()
    bal.history.close()
    written = bal.history.to_csv(tmp_path / "all.csv")
    for path in (written, streamed):
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 3
        for column in (
            "diag/cos/x-y",
            "diag/norm/x",
            "diag/norm_ratio",
            "diag/conflict_fraction",
            "diag/align/y",
            "diag/loss_ratio/x",
        ):
            assert column in rows[0]
        assert float(rows[0]["diag/cos/x-y"]) == pytest.approx(
            float(bal.history.extra("diag/cos")[0, 0]), rel=1e-12
        )
        assert math.isnan(float(rows[1]["diag/norm_ratio"]))
        assert float(rows[2]["diag/loss_ratio/x"]) == pytest.approx(
            float(bal.history.extra("diag/loss_ratio")[2, 0]), rel=1e-12
        )


def test_checkpoint_round_trip_continues_the_same_diagnostics() -> None:
    whole = tb.make("mgda", tasks=3, diagnostics=True)
    run(whole, 5)
    first = tb.make("mgda", tasks=3, diagnostics=True)
    model = run(first, 3)
    state = save_load(first.state_dict())
    resumed = tb.make("mgda", tasks=3, diagnostics=True)
    resumed.load_state_dict(state)
    run(resumed, 2, start=3, model=model)
    assert resumed.history.header() == whole.history.header()
    for name in whole.history.extra_names:
        assert torch.allclose(resumed.history.extra(name), whole.history.extra(name), atol=1e-12)


# ---------------------------------------------------------------- misuse
def test_method_with_its_own_step_refuses_diagnostics() -> None:
    with pytest.raises(BalancerUsageError, match=r"MoDo.*cannot record diagnostics"):
        tb.make("modo", tasks=2, diagnostics=True)


def test_diagnostics_without_a_history_is_refused() -> None:
    with pytest.raises(BalancerUsageError, match="record=False"):
        tb.make("mgda", tasks=2, diagnostics=True, record=False)


@pytest.mark.parametrize("value", [0, -2, 1.5, "yes"])
def test_bad_diagnostics_value(value: Any) -> None:
    with pytest.raises(ValueError, match="diagnostics must be True"):
        tb.make("mgda", tasks=2, diagnostics=value)


def test_diagnostics_is_not_a_hyperparameter_to_compare_on_load() -> None:
    saved = tb.make("mgda", tasks=2)
    run_two = tb.make("mgda", tasks=2, diagnostics=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_two.load_state_dict(save_load(saved.state_dict()))
    assert "diagnostics" not in repr(saved) and "diagnostics=True" in repr(run_two)


# ---------------------------------------------------------------- figure
def test_plot_diagnostics_writes_a_png(tmp_path: Any) -> None:
    bal = tb.MGDA(tasks=3, diagnostics=True)
    run(bal, 5)
    path = tb.plot_diagnostics(bal.history, tmp_path / "diag.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_plot_diagnostics_heatmap_for_many_tasks(tmp_path: Any) -> None:
    bal = tb.MGDA(tasks=7, diagnostics=True)
    gen = torch.Generator().manual_seed(0)
    body = torch.nn.Linear(4, 5)
    for _ in range(3):
        z = body(torch.randn(6, 4, generator=gen))
        losses = [(z[:, i % 5] * (i - 3)).mean() for i in range(7)]
        body.zero_grad()
        bal.backward(losses, shared=body)
    path = tb.plot_diagnostics(bal.history, tmp_path / "many.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_diagnostics_is_refused(tmp_path: Any) -> None:
    bal = tb.MGDA(tasks=2)
    with pytest.raises(ValueError, match="diagnostics=True"):
        tb.plot_diagnostics(bal.history, tmp_path / "x.png")


# ---------------------------------------------------------------- Lightning
@pytest.mark.parametrize("method", ["mgda", "uncertainty"])
def test_lightning_mixin_logs_the_diagnosed_steps(tmp_path: Any, method: str) -> None:
    """A gradient method (its own Gramian) and a loss-weighting method (the engine's, from
    balanced_step's shared= on the diagnosed steps) log what their history holds."""
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from taskbalance.integrations.lightning import BalancerMixin

    class Module(BalancerMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet()
            self.balancer = tb.make(method, tasks=["a", "b", "c"], diagnostics=2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            x, y = batch
            losses = [((out - y[:, i]) ** 2).mean() for i, out in enumerate(self.net(x))]
            return self.balanced_step(losses, shared=self.net.shared)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, targets = batch(0)
    data = DataLoader(TensorDataset(x, torch.stack(targets, 1)), batch_size=2)
    logger = memory_logger()
    module = Module()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module, data)
    history = module.balancer.history
    assert len(history) == 4
    logged = logger.series("diag/cos/a-c")
    expected = history.extra("diag/cos")[:, 1]  # NaN on the steps not diagnosed (1 and 3)
    assert logged.shape == (4,) and torch.isnan(expected[[1, 3]]).all()
    assert not torch.isnan(expected[[0, 2]]).any()
    torch.testing.assert_close(logged.double(), expected, rtol=1e-6, atol=0, equal_nan=True)
    align = logger.series("diag/align/b")
    torch.testing.assert_close(
        align.double(), history.extra("diag/align")[:, 1], rtol=1e-6, atol=0, equal_nan=True
    )


# ---------------------------------------------------------------- every method
DIAGNOSED = [
    m
    for m in tb.list_methods()
    if tb.get(m).supports_diagnostics() and tb.get(m).kind == "gradient"
]
LOSS_DIAGNOSED = [
    m for m in tb.list_methods() if tb.get(m).supports_diagnostics() and tb.get(m).kind == "loss"
]


def test_which_methods_record_diagnostics() -> None:
    kinds = {m: tb.get(m).kind for m in tb.list_methods()}
    assert {"mgda", "upgrad", "pcgrad", "graddrop", "nash_mtl", "sdmgrad_os"} <= set(DIAGNOSED)
    assert not {"modo", "gradnorm", "cr_mogm"} & set(DIAGNOSED + LOSS_DIAGNOSED)
    # every loss-weighting method, through the engine on its diagnosed steps
    assert set(LOSS_DIAGNOSED) == {m for m, kind in kinds.items() if kind == "loss"}
    assert {"dwa", "uncertainty", "famo", "stch", "dtp"} <= set(LOSS_DIAGNOSED)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method", DIAGNOSED)
def test_every_diagnosed_method_aligns_with_the_gradient_it_writes(method: str) -> None:
    """Exact mode where the method has it: the recorded alignment is that of the update
    actually written to the shared parameters (``.grad`` after ``zero_grad``); a
    features-only method: that of ``wᵀJ`` over the features."""
    model = TinyNet(seed=3)
    bal = tb.make(method, 3, diagnostics=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    exact = "exact" in bal.modes
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        x, targets = batch(step)
        z = torch.tanh(model.shared(x))
        losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, targets)]
        params = list(model.shared.parameters())
        grads = task_gradient_vectors(losses, params if exact else [z])
        if exact:
            bal.backward(losses, shared=model.shared)
            written = torch.cat([p.grad.reshape(-1) for p in params]).double()
        else:  # features only (MGDA-UB): the update of z is wᵀJ (z.grad holds more)
            assert bal.needs == "gramian"
            bal.backward(losses, shared=model.shared, features=z)
            written = sum(w * g for w, g in zip(bal.last_weights.double(), grads))
        row = last_row(bal.history)
        sampled = bal.current_subset if bal.current_subset is not None else range(3)
        # a sampled-out task (SDMGrad-OS, M-ConFIG) has NaN entries, nothing else does
        whole = [n for n in row if "/cos" not in n and n not in ("diag/norm", "diag/align")]
        assert all(bool(torch.isfinite(row[n]).all()) for n in whole), method
        norms = row["diag/norm"]
        for i, g in enumerate(grads):
            if i not in sampled:
                assert torch.isnan(norms[i]) and torch.isnan(row["diag/align"][i]), method
                continue
            assert float(norms[i]) == pytest.approx(float(g.norm()), rel=1e-5)
            if float(norms[i]) > 0 and float(written.norm()) > 0:
                expected = float(g @ written) / (float(g.norm()) * float(written.norm()))
                assert float(row["diag/align"][i]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        opt.step()


@pytest.mark.parametrize("factored", [False, True], ids=["J stacked", "factored"])
@pytest.mark.parametrize("method", ["upgrad", "dwa"])
def test_forked_features_record_the_same_diagnostics_as_features(
    method: str, factored: bool
) -> None:
    """A gradient method and a loss-weighting method (whose diagnosed steps go through the
    engine) record the same diagnostics from tb.fork views as from features=z: the same
    numbers with J stacked, the same to float32 rounding with the Gramian from the linear
    heads' factors (a cosine of 0.0013 then differs by 8e-9)."""
    rows = {}
    for forked in (False, True):
        model = TinyNet()
        bal = tb.make(method, 3, diagnostics=True)
        x, targets = batch(0)
        z = torch.tanh(model.shared(x))
        zs = tb.fork(z, 3, factored=factored) if forked else [z] * 3
        losses = [
            ((h(zi).squeeze(-1) - y) ** 2).mean() for h, zi, y in zip(model.heads, zs, targets)
        ]
        bal.backward(losses, features=zs if forked else z)
        rows[forked] = last_row(bal.history)
        assert model.shared.weight.grad is not None  # the update reached the body
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if factored else {"rtol": 1e-6, "atol": 1e-9}
    for name, value in rows[False].items():
        torch.testing.assert_close(rows[True][name], value, **tolerance)


def test_autocast_step_records_finite_diagnostics() -> None:
    model = TinyNet()
    bal = tb.make("mgda", 3, diagnostics=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task_losses(model, 0)
        bal.backward(losses, shared=model.shared)
    row = last_row(bal.history)
    assert row["diag/cos"].dtype == torch.float64
    assert all(bool(torch.isfinite(v).all()) for v in row.values())
    plain, again = tb.make("mgda", 3, diagnostics=True), TinyNet()
    plain.backward(task_losses(again, 0), shared=again.shared)
    # bf16 forward: the same conflict structure to bf16's precision
    expected = last_row(plain.history)["diag/cos"]
    torch.testing.assert_close(row["diag/cos"], expected, atol=0.05, rtol=0)


# ---------------------------------------------------------------- loss-weighting methods
def loss_step(
    bal: tb.Balancer, model: TinyNet, step: int, mode: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One diagnosed-or-not ``backward`` of a loss method; returns the losses' task
    gradient vectors over the mode's inputs (taken first, by an explicit loop) and the
    shared parameters."""
    x, targets = batch(step, len(model.heads))
    z = torch.tanh(model.shared(x))
    losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, targets)]
    params = list(model.shared.parameters())
    grads = task_gradient_vectors(losses, params if mode == "exact" else [z])
    context = {"kpi": [math.exp(-float(v.detach())) for v in losses]} if bal.uses_kpi else {}
    if mode == "exact":
        bal.backward(losses, shared=model.shared, **context)
    else:
        bal.backward(losses, features=z, **context)
    return grads, params


@pytest.mark.parametrize("method", ["dwa", "uncertainty"])
@pytest.mark.parametrize("mode", ["exact", "features"])
def test_loss_method_diagnostics_match_a_per_task_loop(method: str, mode: str) -> None:
    model = TinyNet()
    bal = tb.make(method, tasks=["a", "b", "c"], diagnostics=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):  # DWA's weights leave 1 from its third step
        opt.zero_grad()
        grads, _ = loss_step(bal, model, step, mode)
        w = bal.last_weights.double()
        direction = sum(wi * g for wi, g in zip(w, grads))
        assert_matches_loop(last_row(bal.history), loop_diagnostics(grads, direction), 1e-5)
        opt.step()
    assert bal.history.extra("diag/norm_ratio").isnan().sum() == 0


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method", LOSS_DIAGNOSED)
def test_every_loss_method_aligns_with_the_gradient_it_writes(method: str) -> None:
    """The recorded alignment is that of the update ``.backward`` wrote to the shared
    parameters (so the recorded weights are the combined loss's weights of the task
    gradients, for every loss-weighting method)."""
    model = TinyNet(seed=3)
    required = {"static": {"weights": [1.0, 2.0, 0.5]}}.get(method, {})
    bal = tb.make(method, 3, diagnostics=True, **required)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        grads, params = loss_step(bal, model, step, "exact")
        written = torch.cat([p.grad.reshape(-1) for p in params]).double()
        row = last_row(bal.history)
        for i, g in enumerate(grads):
            expected = float(g @ written) / (float(g.norm()) * float(written.norm()))
            assert float(row["diag/align"][i]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        opt.step()


def train_loss_method(
    method: str, diagnostics: bool | int, mode: str, steps: int = 4, **kw: Any
) -> tuple[TinyNet, tb.Balancer]:
    model = TinyNet()
    bal = tb.make(method, tasks=3, diagnostics=diagnostics, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        loss_step(bal, model, step, mode)
        opt.step()
    return model, bal


@pytest.mark.parametrize("method", ["dwa", "uncertainty"])
@pytest.mark.parametrize("mode", ["exact", "features"])
def test_loss_method_update_is_the_same_with_diagnostics_on(method: str, mode: str) -> None:
    """Bit for bit: the diagnosed steps compute J on the side (autograd.grad, graph kept)
    and the update is the combined loss's ordinary backward."""
    model_off, off = train_loss_method(method, False, mode)
    model_on, on = train_loss_method(method, True, mode)
    for (name, a), b in zip(model_off.named_parameters(), model_on.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(off.history.weights, on.history.weights)
    for p_off, p_on in zip(off.parameters(), on.parameters()):  # uncertainty's log_vars
        assert torch.equal(p_off, p_on)


def test_loss_method_off_computes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("task gradients computed while off")

    monkeypatch.setattr(dg, "task_gramian", refuse)
    _, bal = train_loss_method("dwa", False, "exact", steps=2)
    assert not any(n.startswith("diag/") for n in bal.history.header())
    assert bal.last_diagnostics is None
    # and on the steps that diagnostics=n leaves out
    monkeypatch.undo()
    calls = []
    real = dg.task_gramian
    monkeypatch.setattr(dg, "task_gramian", lambda *a, **k: calls.append(1) or real(*a, **k))
    train_loss_method("dwa", 3, "exact", steps=5)
    assert len(calls) == 2  # steps 0 and 3


def test_loss_method_every_nth_step_and_csv(tmp_path: Any) -> None:
    _, bal = train_loss_method("uncertainty", 2, "features", steps=3)
    ratio = bal.history.extra("diag/norm_ratio")[:, 0]
    assert [not math.isnan(v) for v in ratio.tolist()] == [True, False, True]
    with bal.history.to_csv(tmp_path / "h.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"diag/cos/0-1", "diag/align/2", "diag/loss_ratio/1", "sigma/0"} <= set(rows[0])
    assert float(rows[2]["diag/conflict_fraction"]) == pytest.approx(
        float(bal.history.extra("diag/conflict_fraction")[2, 0]), rel=1e-12
    )
    assert math.isnan(float(rows[1]["diag/cos/0-2"]))


def test_loss_method_checkpoint_round_trip_continues_the_same_diagnostics() -> None:
    _, whole = train_loss_method("dwa", True, "exact", steps=5)
    model = TinyNet()
    first = tb.make("dwa", tasks=3, diagnostics=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(5):
        if step == 3:
            state = save_load(first.state_dict())
            first = tb.make("dwa", tasks=3, diagnostics=True)
            first.load_state_dict(state)
        opt.zero_grad()
        loss_step(first, model, step, "exact")
        opt.step()
    for name in whole.history.extra_names:
        torch.testing.assert_close(
            first.history.extra(name), whole.history.extra(name), rtol=0, atol=1e-12
        )


def test_loss_method_accumulated_step_records_the_mean_of_its_micro_batches() -> None:
    model_a, model_b = TinyNet(), TinyNet()
    acc = tb.make("uncertainty", tasks=3, diagnostics=True, accumulation_steps=2)
    one = tb.make("uncertainty", tasks=3, diagnostics=True)
    for _ in range(2):
        loss_step(acc, model_a, 0, "exact")
    loss_step(one, model_b, 0, "exact")
    assert len(acc.history) == 1
    for name in one.history.extra_names:
        torch.testing.assert_close(
            acc.history.extra(name), one.history.extra(name), rtol=0, atol=1e-12
        )


def test_loss_method_called_without_shared_warns_once() -> None:
    model = TinyNet()
    bal = tb.make("dwa", 3, diagnostics=True)
    with pytest.warns(tb.TaskBalanceWarning, match=r"without shared= or features=.*backward"):
        bal(task_losses(model, 0)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.backward(task_losses(model, 1))  # the same mistake through backward: warned once
    assert bal.last_diagnostics is None and len(bal.history) == 2
    other = tb.make("uncertainty", 3, diagnostics=True)
    with pytest.warns(tb.TaskBalanceWarning, match="without shared= or features="):
        other.backward(task_losses(model, 0))


def test_loss_method_diagnostics_refuse_a_stacked_tensor() -> None:
    model = TinyNet()
    bal = tb.make("dwa", 3, diagnostics=True)
    with pytest.raises(BalancerUsageError, match="list or a dict, not one stacked tensor"):
        bal.backward(torch.stack(task_losses(model, 0)), shared=model.shared)


def test_loss_method_diagnostics_refuse_features_without_grad() -> None:
    model = TinyNet()
    bal = tb.make("dwa", 3, diagnostics=True)
    with pytest.raises(BalancerUsageError, match="features must be tensors that require grad"):
        bal.backward(task_losses(model, 0), features=torch.zeros(8, 3))


class ThreadRanks:
    """R DDP ranks as R threads, a stand-in for torch.distributed: each collective returns
    the sum, in rank order, of what the ranks sent (the same bits on every rank)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.sent: list[list[torch.Tensor]] = [[] for _ in range(world_size)]

    def exchange(self, rank: int, tensors: Any) -> list[torch.Tensor]:
        self.sent[rank] = [t.detach().clone() for t in tensors]
        self.barrier.wait()
        summed = [torch.stack(parts).sum(0) for parts in zip(*self.sent)]
        self.barrier.wait()
        return summed

    def sync(self, rank: int) -> Any:
        ranks = self

        class RankSync:
            world_size = ranks.world_size

            def all_reduce(self, tensors: Any, scales: Any = 1.0) -> list[torch.Tensor]:
                summed = ranks.exchange(rank, tensors)
                factors = [float(scales)] * len(summed) if not isinstance(scales, list) else scales
                return [t * f for t, f in zip(summed, factors)]

            def mean(self, tensors: Any) -> list[torch.Tensor]:
                return self.all_reduce(list(tensors), 1.0 / ranks.world_size)

            def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
                return tensor.copy_(self.mean([tensor])[0])

        return RankSync()

    def run(self, fn: Any) -> list[Any]:
        def guarded(rank: int) -> Any:
            try:
                return fn(rank)
            except BaseException:
                self.barrier.abort()
                raise

        with ThreadPoolExecutor(self.world_size) as pool:
            return [f.result() for f in [pool.submit(guarded, r) for r in range(self.world_size)]]


@pytest.mark.parametrize("method", ["dwa", "uncertainty"])
@pytest.mark.parametrize("mode", ["exact", "features"])
def test_loss_method_ranks_record_the_diagnostics_of_the_global_batch(
    monkeypatch: pytest.MonkeyPatch, method: str, mode: str
) -> None:
    """Two ranks with half of every batch record what one process records on the whole
    batch (exact: the Gramian of the rank-averaged J; features: (1/R²) Σ_r J^r J^rᵀ)."""

    def run_rank(bal: tb.Balancer, model: TinyNet, rows: slice, sync: Any) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(4):
            opt.zero_grad()
            x, targets = batch(step)
            z = torch.tanh(model.shared(x[rows]))
            losses = [
                ((h(z).squeeze(-1) - y[rows]) ** 2).mean() for h, y in zip(model.heads, targets)
            ]
            bal.backward(
                losses, **({"shared": model.shared} if mode == "exact" else {"features": z})
            )
            params = list(model.parameters())
            if sync is not None:  # what DDP does to the model's gradients
                for p, g in zip(params, sync.mean([p.grad for p in params])):
                    p.grad = g
            opt.step()

    one = tb.make(method, 3, diagnostics=True)
    run_rank(one, TinyNet(), slice(0, 8), None)
    ranks = ThreadRanks(2)
    setups = [(tb.make(method, 3, diagnostics=True), TinyNet()) for _ in range(2)]
    syncs = [ranks.sync(rank) for rank in range(2)]
    for rank, (bal, _) in enumerate(setups):
        monkeypatch.setattr(bal, "current_sync", lambda s=syncs[rank]: s)
    ranks.run(lambda r: run_rank(*setups[r], slice(4 * r, 4 * r + 4), syncs[r]))
    for name in one.history.extra_names:
        if not name.startswith("diag/"):
            continue
        assert torch.equal(setups[0][0].history.extra(name), setups[1][0].history.extra(name))
        torch.testing.assert_close(
            setups[0][0].history.extra(name), one.history.extra(name), rtol=1e-5, atol=1e-7
        )


def test_summarize_counts_from_hand_made_rows() -> None:
    history = tb.History(["a", "b", "c"])
    history.define_extra("diag/cos", ["a-b", "a-c", "b-c"])
    history.define_extra("diag/norm_ratio", [""])
    history.define_extra("diag/conflict_fraction", [""])
    rows = [  # (norm ratio, conflict fraction, alignment per task); None: not diagnosed
        (2.0, 1 / 3, [0.5, -0.1, 0.2]),
        None,
        (8.0, 2 / 3, [0.3, -0.2, -0.4]),
        (4.0, 0.0, [0.1, 0.2, -0.3]),
        (1.0, 1.0, [-0.5, 0.4, -0.1]),
    ]
    for step, row in enumerate(rows):
        extras = {}
        if row is not None:
            ratio, conflict, align = row
            extras = {
                "diag/cos": torch.zeros(3),
                "diag/norm_ratio": torch.tensor([ratio]),
                "diag/conflict_fraction": torch.tensor([conflict]),
                "diag/align": torch.tensor(align),
            }
        history.append(step, torch.ones(3), torch.ones(3), **extras)
    facts = dg.summarize(history)
    assert facts["diagnosed"] == 4
    assert facts["mean_conflict_fraction"] == pytest.approx(0.5)
    assert facts["median_norm_ratio"] == 2.0  # the lower median of 1, 2, 4, 8
    assert list(facts["negative_alignment"].items()) == [("c", 3), ("b", 2), ("a", 1)]


def test_summarize_without_diagnostics_is_refused() -> None:
    bal = tb.make("mgda", 3)
    run(bal, 1)
    with pytest.raises(ValueError, match="no diagnostics: build the balancer with diagnostics"):
        dg.summarize(bal.history)


def test_loss_method_with_a_head_in_shared_warns_once() -> None:
    model = TinyNet()
    bal = tb.make("dwa", 3, diagnostics=True)
    with pytest.warns(tb.TaskBalanceWarning, match=r"heads\.0\.weight.*look like a head.*trunk"):
        bal.backward(task_losses(model, 0), shared=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.backward(task_losses(model, 1), shared=model)
        bal.backward(task_losses(model, 2), shared=model.shared)
    assert len(bal.history) == 3


def test_a_subset_step_reports_the_sampled_tasks_and_nan_for_the_others() -> None:
    """SDMGrad-OS computes 2 of 4 task gradients a step: the diagnostics are those of the
    sampled tasks (as a per-task loop over them gives), NaN for the unsampled ones (not a
    zero norm and a zero cosine, which would read as a task without gradient)."""
    torch.manual_seed(0)
    body = torch.nn.Linear(4, 6)
    bal = tb.make("sdmgrad_os", tasks=4, n=2, diagnostics=True, seed=3)
    z = body(torch.randn(8, 4))
    losses = [(z[:, i] * (i + 1) + z[:, i + 1]).pow(2).mean() for i in range(4)]
    params = list(body.parameters())
    grads = task_gradient_vectors(losses, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal.backward(losses, shared=body)
    subset = bal.current_subset
    assert subset is not None and len(subset) == 2
    row = last_row(bal.history)
    written = torch.cat([p.grad.reshape(-1) for p in params]).double()
    expected = loop_diagnostics([grads[i] for i in subset], written)
    a, b = subset
    others = [i for i in range(4) if i not in subset]
    torch.testing.assert_close(
        row["diag/norm"][subset], torch.tensor(expected["norm"], dtype=torch.float64)
    )
    torch.testing.assert_close(
        row["diag/align"][subset], torch.tensor(expected["align"], dtype=torch.float64)
    )
    assert torch.isnan(row["diag/norm"][others]).all()
    assert torch.isnan(row["diag/align"][others]).all()
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    cos = row["diag/cos"]
    assert float(cos[pairs.index((a, b))]) == pytest.approx(float(expected["cos"][0]), rel=1e-6)
    assert all(torch.isnan(cos[n]) for n, pair in enumerate(pairs) if pair != (a, b))
    assert float(row["diag/norm_ratio"][0]) == pytest.approx(expected["norm_ratio"], rel=1e-6)
