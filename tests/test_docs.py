"""The documentation is code: every ```python block of README.md and docs/**/*.md runs.

Conventions (for anyone writing a page):

* **docs/ pages**: each block is a complete program — imports, a tiny model and data
  defined in the block — so that a reader can paste it and run it. It runs alone, in a
  fresh namespace (``__name__ == "__main__"``), from a temporary working directory (files
  it writes land there), after ``torch.manual_seed(0)``.
* **README.md**: each block runs alone in a fresh copy of :func:`readme_namespace`: your
  ``model`` (a shared ``model.body`` and a ``model.heads`` ModuleDict, ``model(x)`` returns
  ``{"seg": logits, "depth": value}``), ``loader`` of ``(x, y_seg, y_depth)``, ``opt``,
  ``epochs``, ``ce`` and ``l1``. Every block is still a complete training step.
* **Every block that runs must train**: it creates (or, in the README, uses) at least one
  optimizer, every parameter handed to an optimizer during the block has changed at the
  end, and every balancer the block leaves behind has taken at least one step.
* A block that cannot run standalone (it needs several processes, or is a fragment of a
  larger class) is marked with ``<!-- not-run: reason -->`` on the line right before its
  opening fence. Marked blocks need a reason, are at most :data:`MAX_NOT_RUN_LINES` lines
  long and at most a quarter of all blocks.
* A DDP program (one that calls ``init_process_group``) runs as under ``torchrun`` with one
  process: ``RANK=0``, ``WORLD_SIZE=1``, ``MASTER_ADDR``/``MASTER_PORT`` set; the process
  group is destroyed afterwards. A block that imports Lightning is skipped when Lightning
  is not installed.
* Python is fenced as ```python, nothing else (```py or ```pycon would escape this test).
"""

from __future__ import annotations

import gc
import importlib.util
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import taskbalance as tb
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_NOT_RUN_LINES = 15
#: a generous bound on a block's wall time (blocks take a few seconds on a busy 2-core machine)
MAX_SECONDS = 60.0

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run\s*(?::\s*(.*?))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One ```python block: its page, the line of its opening fence, its code."""

    page: Path
    line: int
    code: str
    not_run: str | None  # the marker's reason ("" when the marker has none); None: runs

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_page(page: Path, text: str | None = None) -> tuple[list[Block], list[str]]:
    """The python blocks of ``page`` (read from disk unless ``text`` is given) and the
    problems found while reading it."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    rel = page.relative_to(ROOT)
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            if NOT_RUN.match(lines[i]) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                problems.append(f"{rel}:{i + 1}: not-run marker not right before a code fence")
            i += 1
            continue
        indent, language = opening.groups()
        end = i + 1
        while end < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[end]):
            end += 1
        if end == len(lines):
            problems.append(f"{rel}:{i + 1}: code fence never closed")
            break
        marker = NOT_RUN.match(lines[i - 1]) if i > 0 else None
        if language.lower() in ("py", "py3", "python3", "pycon", "ipython", "pytb"):
            problems.append(f"{rel}:{i + 1}: fence Python as ```python, not ```{language}")
        elif language == "python":
            body = [line[len(indent) :] for line in lines[i + 1 : end]]
            reason = None if marker is None else (marker.group(1) or "")
            blocks.append(Block(page, i + 1, "\n".join(body) + "\n", reason))
        elif marker is not None:
            problems.append(f"{rel}:{i + 1}: not-run marker on a ```{language} block")
        i = end + 1
    return blocks, problems


ALL: list[Block] = []
PROBLEMS: list[str] = []
for _page in PAGES:
    _blocks, _problems = parse_page(_page)
    ALL.extend(_blocks)
    PROBLEMS.extend(_problems)
RUN = [b for b in ALL if b.not_run is None]
MARKED = [b for b in ALL if b.not_run is not None]


class TwoTaskNet(nn.Module):
    """The README's ``model``: a shared body, a head per task, ``{"seg", "depth"}`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.heads = nn.ModuleDict({"seg": nn.Linear(8, 3), "depth": nn.Linear(8, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.body(x)
        return {task: head(z) for task, head in self.heads.items()}


def readme_namespace() -> dict[str, Any]:
    """The names the README's blocks use, as a user's training script would have them."""
    model = TwoTaskNet()
    batches = [
        (torch.randn(16, 4), torch.randint(0, 3, (16,)), torch.randn(16, 1)) for _ in range(3)
    ]
    return {
        "__name__": "__main__",
        "epochs": 2,
        "model": model,
        "loader": batches,
        "ce": nn.functional.cross_entropy,
        "l1": nn.functional.l1_loss,
        "opt": torch.optim.SGD(model.parameters(), lr=0.05),
    }


def live_balancers() -> dict[int, tb.Balancer]:
    return {id(o): o for o in gc.get_objects() if issubclass(type(o), tb.Balancer)}


def test_pages_are_well_formed() -> None:
    assert not PROBLEMS, "\n".join(PROBLEMS)


def test_there_are_blocks_on_the_usage_pages() -> None:
    pages = {b.page.name for b in RUN}
    assert {"README.md", "scaling.md", "lightning_amp.md"} <= pages
    assert sum(b.page == README for b in RUN) >= 3


def test_not_run_blocks_are_few_short_and_explained() -> None:
    for block in MARKED:
        assert block.not_run, f"{block.name}: <!-- not-run: ... --> needs a reason"
        length = len(block.code.strip().splitlines())
        assert length <= MAX_NOT_RUN_LINES, (
            f"{block.name}: a not-run block has {length} lines (at most {MAX_NOT_RUN_LINES}): "
            "make it a complete program that runs, or shorten it"
        )
    assert 4 * len(MARKED) <= len(ALL), [b.name for b in MARKED]


def test_the_markers_are_read() -> None:
    """A marker right before a fence marks the block; one elsewhere is a problem."""
    page = ROOT / "docs" / "_probe.md"
    text = (
        "<!-- not-run: needs torchrun -->\n```python\nx = 1\n```\n\n"
        "<!-- not-run -->\n```python\ny = 2\n```\n\n"
        "<!-- not-run: lost -->\n\n```python\nz = 3\n```\n```py\nw = 4\n```\n"
    )
    blocks, problems = parse_page(page, text)
    assert [(b.line, b.not_run) for b in blocks] == [(2, "needs torchrun"), (7, ""), (13, None)]
    assert [p.split(": ", 1)[1] for p in problems] == [
        "not-run marker not right before a code fence",
        "fence Python as ```python, not ```py",
    ]


def run_and_check(block: Block, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run ``block`` (see the module docstring); return what it did wrong (empty: fine).

    ``monkeypatch`` undoes the patches, the environment and the working directory.
    """
    # every parameter given to an optimizer during the block, with its value at that time
    handed: list[tuple[torch.Tensor, torch.Tensor]] = []
    add_group = torch.optim.Optimizer.add_param_group

    def recording_add_param_group(self: torch.optim.Optimizer, group: dict[str, Any]) -> None:
        add_group(self, group)
        handed.extend((p, p.detach().clone()) for p in self.param_groups[-1]["params"])

    # a .grad that an optimizer step reuses from its previous step, never cleared between
    # (zero_grad(set_to_none=True) or the balancers' own optimizers make new tensors)
    zero_grad = torch.optim.Optimizer.zero_grad
    zeroed: set[int] = set()
    seen: dict[int, list[torch.Tensor | None]] = {}
    kept: list[torch.optim.Optimizer] = []  # keeps the ids in `seen` unique
    accumulated: list[tuple[int, ...]] = []

    def recording_zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
        zeroed.add(id(self))
        zero_grad(self, set_to_none)

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"]]
        previous = seen.get(id(opt))
        if previous is not None and id(opt) not in zeroed:
            params = [p for group in opt.param_groups for p in group["params"]]
            accumulated.extend(
                tuple(p.shape)
                for p, old, new in zip(params, previous, grads)
                if old is not None and old is new
            )
        zeroed.discard(id(opt))
        seen[id(opt)] = grads
        kept.append(opt)

    monkeypatch.setattr(torch.optim.Optimizer, "add_param_group", recording_add_param_group)
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", recording_zero_grad)
    hook = register_optimizer_step_pre_hook(before_step)
    torch.manual_seed(0)
    namespace = readme_namespace() if block.page == README else {"__name__": "__main__"}
    before = live_balancers()
    start = time.perf_counter()
    try:
        exec(compile(block.code, block.name, "exec"), namespace)
    finally:
        hook.remove()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    seconds = time.perf_counter() - start

    problems = []
    if not handed:
        problems.append("no optimizer: a block must show a whole training step")
    unchanged = [tuple(p.shape) for p, start_value in handed if torch.equal(p, start_value)]
    if unchanged:
        problems.append(f"parameters of shapes {unchanged} never changed")
    if accumulated:
        problems.append(
            f"optimizer steps on gradients of shapes {sorted(set(accumulated))} added to the "
            "previous step's: call opt.zero_grad() before the backward"
        )
    new = [b for key, b in live_balancers().items() if key not in before]
    idle = [repr(b) for b in new if b.steps == 0]
    if idle:
        problems.append(f"balancers that never stepped: {idle}")
    if seconds > MAX_SECONDS:
        problems.append(f"took {seconds:.0f} s (at most {MAX_SECONDS:.0f})")
    return problems


KERAS_BLOCK = re.compile(r"^\s*(import|from)\s+taskbalance\.keras\b", re.M)


def run_and_check_keras(block: Block, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A Keras block (docs/keras.md) trains with ``BalancedModel.fit``: every model it fits
    has all its trainable variables changed by its first fit, and its balancer stepped."""
    import taskbalance.keras as tbk

    fitted: list[tuple[Any, list[Any]]] = []
    fit = tbk.BalancedModel.fit

    def recording_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        if all(model is not self for model, _ in fitted):
            fitted.append((self, [v.numpy().copy() for v in self.trainable_variables]))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(tbk.BalancedModel, "fit", recording_fit)
    start = time.perf_counter()
    exec(compile(block.code, block.name, "exec"), {"__name__": "__main__"})
    seconds = time.perf_counter() - start
    problems = [] if fitted else ["no BalancedModel.fit: a block must show a whole training"]
    for model, values in fitted:
        same = [
            v.path for v, old in zip(model.trainable_variables, values) if (v.numpy() == old).all()
        ]
        if same:
            problems.append(f"variables {same} never changed")
        if float(model.balancer.steps.numpy()) == 0:
            problems.append(f"{type(model.balancer).__name__} never stepped")
    if seconds > MAX_SECONDS:
        problems.append(f"took {seconds:.0f} s (at most {MAX_SECONDS:.0f})")
    return problems


@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_block_runs_and_trains(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if KERAS_BLOCK.search(block.code):
        if importlib.util.find_spec("keras") is None:
            pytest.skip("Keras is not installed (pip install 'taskbalance[keras]')")
        monkeypatch.setenv("KERAS_BACKEND", "torch")  # only read if Keras is not loaded yet
        monkeypatch.chdir(tmp_path)
        problems = run_and_check_keras(block, monkeypatch)
        assert not problems, f"{block.name}: " + "; ".join(problems)
        return
    lightning = re.search(r"^\s*(import|from)\s+(lightning|pytorch_lightning)\b", block.code, re.M)
    if lightning and importlib.util.find_spec("lightning") is None:
        pytest.skip("Lightning is not installed (pip install 'taskbalance[lightning]')")
    if "init_process_group" in block.code:
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.chdir(tmp_path)
    problems = run_and_check(block, monkeypatch)
    assert not problems, f"{block.name}: " + "; ".join(problems)


STEP = """
import torch
import taskbalance as tb

body, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in "ab")
opt = torch.optim.SGD([*body.parameters(), *heads.parameters()], lr=0.1)
bal = tb.make("{method}", tasks=2)
x, y = torch.randn(16, 4), torch.randn(16, 1)
for step in range(3):
    z = body(x)
    losses = [((head(z) - y) ** 2).mean() for head in heads]
    {zero}
    bal.backward(losses, shared=body)
    {step}
"""


@pytest.mark.parametrize("method", ["upgrad", "uncertainty", "famo"])
def test_the_check_passes_a_whole_step(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    code = STEP.format(method=method, zero="opt.zero_grad()", step="opt.step()")
    assert run_and_check(Block(ROOT / "probe.md", 1, code, None), monkeypatch) == []


@pytest.mark.parametrize("method", ["upgrad", "uncertainty"])
def test_the_check_catches_a_missing_zero_grad(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs' old mistake: steps on gradients summed over every step so far."""
    code = STEP.format(method=method, zero="pass", step="opt.step()")
    (problem,) = run_and_check(Block(ROOT / "probe.md", 1, code, None), monkeypatch)
    assert "call opt.zero_grad() before the backward" in problem
    assert "(8, 4)" in problem  # the body's weight


def test_the_check_catches_a_missing_step_and_an_idle_balancer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code = STEP.format(method="upgrad", zero="opt.zero_grad()", step="pass")
    code += "unused = tb.make('dwa', tasks=2)\n"
    problems = run_and_check(Block(ROOT / "probe.md", 1, code, None), monkeypatch)
    assert [p.split(" ")[0] for p in problems] == ["parameters", "balancers"]
    assert "DWA(" in problems[1]


KERAS_IDLE = """
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
import keras

import taskbalance.keras as tbk

inputs = keras.Input((4,))
net = keras.Model(inputs, {t: keras.layers.Dense(1)(inputs) for t in "ab"})
model = tbk.BalancedModel(net, tbk.make("dwa", tasks=["a", "b"]))
model.compile(optimizer="sgd", loss={"a": "mse", "b": "mse"})
"""


def test_the_keras_check_catches_a_block_that_never_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("keras", reason="Keras is not installed")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    problems = run_and_check_keras(Block(ROOT / "probe.md", 1, KERAS_IDLE, None), monkeypatch)
    assert problems == ["no BalancedModel.fit: a block must show a whole training"]


def test_readme_quick_start_is_two_commands() -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert len(commands) == 1
    lines = [line.split("#", 1)[0].strip() for line in commands[0].splitlines()]
    assert [line for line in lines if line] == ["make demo", "make test"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_docs_page_is_linked() -> None:
    """No orphan page: each docs/ page is linked from the README or another page."""
    linked: set[Path] = set()
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s#]+)", page.read_text()):
            linked.add((page.parent / target).resolve())
    orphans = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"pages no other page links to: {orphans}"


def test_readme_documentation_list_names_the_training_and_state_pages() -> None:
    section = README.read_text().split("## Documentation", 1)[1]
    for page in ("docs/alternating.md", "docs/state.md"):
        assert f"]({page})" in section, f"README's documentation list lacks {page}"
