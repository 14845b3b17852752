"""Learning to branch: a tree-structured network whose branching is learned.

Guo, Lee, Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020. The network is a
tree of layers of *nodes* (here an ``nn.Linear`` followed by a ReLU). The root is the input;
every node of layer ``l`` reads exactly one *parent* node of layer ``l - 1``, and every task
head (its tower) reads one node of the last layer. Which parent is a learned choice: child
``j`` of layer ``l`` holds branching logits ``α_j`` over the ``N_{l-1}`` candidate parents,
and during the search its input is the Gumbel-softmax relaxation of that choice,

    d_j = softmax((α_j + g_j) / τ),   g_ji = -log(-log u_ji),  u_ji ~ U(0, 1),
    input_j = sum_i d_ji h_i                (h_i: output of node i of layer l - 1),

so the whole tree (network weights and branching logits) trains end to end by
back-propagation; ``softmax(α_j)`` are the paper's branching probabilities (here uniform
at initialisation: ``α = 0``; ``softmax((log θ + g)/τ)`` with ``θ = softmax(α)`` is the same
sample). One ``g`` is drawn per forward pass, for the whole batch. The
temperature ``τ`` is annealed during training (:meth:`LearningToBranch.anneal`, e.g. once per
epoch), so that the relaxed choices approach one-hot. After the search the argmax tree
(:meth:`LearningToBranch.architecture`) is kept: :meth:`LearningToBranch.derive` freezes it,
drops the nodes no task reaches and the branching logits, and the model becomes an ordinary
branched network with hard routing (its trained weights are kept).

Design space (the *branching factors*): layer ``l`` has ``N_l = N_{l-1} · branching[l]``
nodes, ``N_{-1} = 1`` (the input), each of width ``widths[l]``; the first layer's nodes all
read the input. Default ``branching = (1, 2, 2, ...)``: one shared first node, then every
layer has twice as many candidate nodes as the one before. Layers whose previous layer has a
single node have no choice to make and no logits.

Training: the paper updates the branching logits with their own optimizer (and learning
rate), apart from the network weights. :meth:`LearningToBranch.branching_parameters` and
:meth:`LearningToBranch.weight_parameters` give the two groups, e.g.
``torch.optim.Adam(model.branching_parameters(), lr=...)`` next to the weights' optimizer.
In ``model.eval()`` (before ``derive()``) the network routes along the argmax tree without
noise, i.e. it evaluates the tree ``derive()`` would keep. ``noise_seed=`` (an int) makes
every forward pass draw the same noise (per set of logits), for reproducible evaluation and
tests; ``None`` (default) draws fresh noise from torch's global generator (under DDP each
rank then draws its own sample, as it does for dropout).

What is shared (the rule behind ``shared_parameters()`` / ``task_parameters(t)``): a
parameter is shared when more than one task's loss reaches it under the current
architecture. *Before* ``derive()`` every node feeds every child with a positive weight, so
every task reaches every node: all nodes and the layers' branching logits are shared, and
task ``t`` owns its tower and its own head logits ``task_logits[t]``. *After* ``derive()`` a
node is shared iff its subtree holds at least two tasks (it is on two tasks' paths), and a
node on one task's path only belongs to that task; a shared node need not be on *every*
task's path (the other tasks' gradients there are zero). ``branching_parameters()`` is a
separate listing for the optimizer and overlaps this partition.

``features(x)`` / ``heads(z, x)``: before ``derive()``, ``z`` is the last layer's node outputs
``(B, N_L, widths[-1])`` and the heads are the task choices and towers. After ``derive()``,
``z`` is the list of the *frontier* nodes' outputs (for each task, the deepest shared node on
its path; each node once, by layer then index) and each head runs its task's own nodes from
there; a task whose path shares no node starts from the input, so pass ``x``.
Either way ``heads(features(x), x)`` is ``forward(x)`` (with ``noise_seed`` set, before
``derive()``: the noise is the same in both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taskbalance.balancer import Tasks
from taskbalance.models._layers import OutFeatures, mlp, out_sizes, unique


@dataclass(frozen=True)
class BranchingTree:
    """A discrete tree: ``parents[l][j]`` is the index in layer ``l - 1`` of node ``j`` of
    layer ``l``'s parent (0 for the first layer: the input); ``task_parents[t]`` is the node
    of the last layer that task ``t``'s head reads."""

    parents: tuple[tuple[int, ...], ...]
    task_parents: Mapping[str, int]

    def path(self, task: str) -> tuple[int, ...]:
        """Node index, layer by layer from the first, on task ``task``'s path."""
        node = self.task_parents[task]
        path = [node]
        for layer in range(len(self.parents) - 1, 0, -1):
            node = self.parents[layer][node]
            path.append(node)
        return tuple(reversed(path))

    def tasks_through(self, layer: int, node: int) -> tuple[str, ...]:
        """The tasks whose path goes through node ``node`` of layer ``layer``."""
        return tuple(t for t in self.task_parents if self.path(t)[layer] == node)


def _check_positive_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


class LearningToBranch(nn.Module):
    """Tree of MLP nodes whose parent choices are learned with Gumbel-softmax.

    Args:
        in_features: input width.
        tasks: number of tasks or their names.
        widths: output width of every node of each layer.
        branching: branching factor per layer (``len(widths)`` positive ints): layer ``l``
            has ``N_{l-1} · branching[l]`` nodes (``N_{-1} = 1``). Default
            ``(1, 2, 2, ...)``.
        tower_hidden: hidden widths of each task's tower.
        out_features: output width, for all tasks or per task name.
        temperature: initial Gumbel-softmax temperature ``τ`` (a hyperparameter; anneal
            it with :meth:`anneal`).
        noise_seed: ``None`` for fresh Gumbel noise every forward pass, or an int ``>= 0`` to
            draw the same noise every time.

    Attributes: ``layers`` (``layers[l][j]``: ``nn.Linear`` of node ``j`` of layer ``l``),
    ``branch_logits`` (``{str(l): (N_l, N_{l-1})}`` for layers with a choice),
    ``task_logits`` (``{task: (N_L,)}`` when the last layer has several nodes), ``towers``,
    ``tree`` (``None`` until :meth:`derive`, then the kept, re-indexed tree) and
    ``searched`` (the tree given to :meth:`derive`, in the full design space).
    """

    def __init__(
        self,
        in_features: int,
        tasks: Tasks,
        widths: Sequence[int] = (32, 32, 32),
        branching: Sequence[int] | None = None,
        tower_hidden: Sequence[int] = (8,),
        out_features: OutFeatures = 1,
        temperature: float = 1.0,
        noise_seed: int | None = None,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise ValueError(f"widths needs at least one layer of positive width, got {widths}")
        if branching is None:
            branching = [1] + [2] * (len(widths) - 1)
        branching = [int(b) for b in branching]
        if len(branching) != len(widths) or min(branching) < 1:
            raise ValueError(
                f"branching must hold one factor >= 1 per layer of widths ({len(widths)}), "
                f"got {branching}"
            )
        sizes = out_sizes(tasks, out_features)
        self.tasks: tuple[str, ...] = tuple(sizes)
        self.temperature = _check_positive_finite("temperature", temperature)
        self.noise_seed = noise_seed
        counts, n = [], 1
        for b in branching:
            n *= b
            counts.append(n)
        ins = [in_features, *widths[:-1]]
        self.layers = nn.ModuleList(
            nn.ModuleList(nn.Linear(i, w) for _ in range(c)) for i, w, c in zip(ins, widths, counts)
        )
        self.branch_logits = nn.ParameterDict(
            {
                str(layer): nn.Parameter(torch.zeros(counts[layer], counts[layer - 1]))
                for layer in range(1, len(counts))
                if counts[layer - 1] > 1
            }
        )
        last = counts[-1]
        self.task_logits = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(last)) for t in self.tasks} if last > 1 else {}
        )
        self.towers = nn.ModuleDict({t: mlp(widths[-1], tower_hidden, n) for t, n in sizes.items()})
        self.tree: BranchingTree | None = None
        self.searched: BranchingTree | None = None
        self._owners_cache: list[list[tuple[str, ...]]] | None = None
        self._frontier_cache: dict[str, tuple[int, int] | None] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def noise_seed(self) -> int | None:
        """``None``: fresh Gumbel noise each forward pass; an int: the same noise each time."""
        return self._noise_seed

    @noise_seed.setter
    def noise_seed(self, seed: int | None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"noise_seed must be None or an int >= 0, got {seed!r}")
        self._noise_seed = seed

    def anneal(self, rate: float) -> float:
        """Multiply the temperature by ``rate`` (e.g. ``0.9`` once per epoch); return it."""
        self.temperature *= _check_positive_finite("rate", rate)
        return self.temperature

    def set_temperature(self, temperature: float) -> None:
        """Set the Gumbel-softmax temperature ``τ > 0``."""
        self.temperature = _check_positive_finite("temperature", temperature)

    # ------------------------------------------------------------------ branching
    @property
    def counts(self) -> list[int]:
        """Number of nodes per layer (after :meth:`derive`: the nodes kept)."""
        return [len(nodes) for nodes in self.layers]

    def _choice(self, logits: Tensor, site: int) -> Tensor:
        """Relaxed one-hot choice along the last dimension of ``logits``."""
        if not self.training:
            return nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        if self.noise_seed is None:
            e = torch.empty_like(logits).exponential_()
        else:
            g = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + site)
            e = torch.empty(logits.shape, dtype=logits.dtype).exponential_(generator=g)
            e = e.to(logits.device)
        gumbel = -e.clamp_min(torch.finfo(e.dtype).tiny).log()
        return ((logits + gumbel) / self.temperature).softmax(-1)

    def branch_weights(self) -> tuple[list[Tensor], dict[str, Tensor]]:
        """This pass's parent weights: per layer ``(N_l, N_{l-1})`` (the first layer, and
        layers with one candidate parent: ones ``(N_l, 1)``), and ``{task: (N_L,)}``. Rows are
        Gumbel-softmax samples in training mode, the argmax one-hot in eval mode."""
        if self.tree is not None:
            raise ValueError(
                "branch_weights() is for the search; after derive() the tree is fixed: "
                "see architecture()"
            )
        layers = []
        for layer, nodes in enumerate(self.layers):
            logits = self.branch_logits.get(str(layer))
            if logits is None:
                layers.append(nodes[0].weight.new_ones(len(nodes), 1))
            else:
                layers.append(self._choice(logits, layer))
        tasks = {}
        for k, t in enumerate(self.tasks):
            if t in self.task_logits:
                tasks[t] = self._choice(self.task_logits[t], len(self.layers) + k)
            else:
                tasks[t] = layers[-1].new_ones(1)
        return layers, tasks

    def architecture(self) -> BranchingTree:
        """The discrete tree: each node's most likely parent (argmax of its logits; the first
        on ties), or the frozen tree after :meth:`derive`."""
        if self.tree is not None:
            return self.tree
        parents = []
        for layer, nodes in enumerate(self.layers):
            key = str(layer)
            if key in self.branch_logits:
                parents.append(tuple(int(i) for i in self.branch_logits[key].argmax(-1)))
            else:
                parents.append((0,) * len(nodes))
        task_parents = {
            t: int(self.task_logits[t].argmax()) if t in self.task_logits else 0 for t in self.tasks
        }
        return BranchingTree(tuple(parents), task_parents)

    def derive(self, tree: BranchingTree | None = None) -> LearningToBranch:
        """Freeze a discrete tree (default: :meth:`architecture`, the argmax tree): keep only
        the nodes on some task's path (with their weights), re-index them, drop every
        branching logit; return ``self``. Build the optimizers again afterwards (parameters
        were removed). ``searched`` keeps the tree as given, in the full design space, so a
        derived model can be rebuilt: ``LearningToBranch(<same arguments>).derive(
        old.searched).load_state_dict(old.state_dict())``. A no-op once derived (with the
        same tree or none)."""
        if self.tree is not None:
            if tree is not None and tree != self.searched:
                raise ValueError(
                    "this model is already derived with another tree; build a new "
                    "LearningToBranch and derive() that one"
                )
            return self
        if tree is None:
            tree = self.architecture()
        self._check_tree(tree)
        keep = [
            sorted({tree.path(t)[layer] for t in self.tasks}) for layer in range(len(self.layers))
        ]
        index = [{old: new for new, old in enumerate(kept)} for kept in keep]
        parents = [tuple(0 for _ in keep[0])]
        for layer in range(1, len(keep)):
            parents.append(tuple(index[layer - 1][tree.parents[layer][j]] for j in keep[layer]))
        task_parents = {t: index[-1][tree.task_parents[t]] for t in self.tasks}
        self.layers = nn.ModuleList(
            nn.ModuleList(nodes[j] for j in kept) for nodes, kept in zip(self.layers, keep)
        )
        self.branch_logits = nn.ParameterDict()
        self.task_logits = nn.ParameterDict()
        self.searched = BranchingTree(tree.parents, dict(tree.task_parents))
        self.tree = BranchingTree(tuple(parents), task_parents)
        return self

    def _check_tree(self, tree: BranchingTree) -> None:
        counts = self.counts
        problem = None
        if len(tree.parents) != len(counts):
            problem = f"{len(tree.parents)} layers, the model has {len(counts)}"
        elif [len(p) for p in tree.parents] != counts:
            problem = f"{[len(p) for p in tree.parents]} nodes per layer, the model has {counts}"
        elif any(p != 0 for p in tree.parents[0]):
            problem = "the first layer's nodes read the input: their parents must be 0"
        elif any(
            not 0 <= p < counts[layer - 1]
            for layer in range(1, len(counts))
            for p in tree.parents[layer]
        ):
            problem = "a parent index is out of range"
        elif set(tree.task_parents) != set(self.tasks):
            problem = f"tasks {sorted(tree.task_parents)}, the model has {sorted(self.tasks)}"
        elif any(not 0 <= p < counts[-1] for p in tree.task_parents.values()):
            problem = "a task's parent index is out of range"
        if problem is not None:
            raise ValueError(
                f"the tree does not fit this model ({problem}); pass the searched tree of a "
                "model built with the same widths, branching and tasks (its architecture() "
                "before derive(), or .searched after)"
            )

    # ------------------------------------------------------------------ derived tree
    def _owners(self) -> list[list[tuple[str, ...]]]:
        """Derived tree: the tasks through each node, per layer (computed once: the derived
        tree never changes)."""
        assert self.tree is not None
        if self._owners_cache is None:
            tree = self.tree
            self._owners_cache = [
                [tree.tasks_through(layer, j) for j in range(len(nodes))]
                for layer, nodes in enumerate(self.layers)
            ]
        return self._owners_cache

    def _frontier(self) -> dict[str, tuple[int, int] | None]:
        """Derived tree: each task's deepest shared node ``(layer, index)``, or ``None``."""
        assert self.tree is not None
        if self._frontier_cache is None:
            owners = self._owners()
            out: dict[str, tuple[int, int] | None] = {}
            for t in self.tasks:
                path = self.tree.path(t)
                shared = [(layer, j) for layer, j in enumerate(path) if len(owners[layer][j]) > 1]
                out[t] = shared[-1] if shared else None
            self._frontier_cache = out
        return self._frontier_cache

    def _shared_outputs(self, x: Tensor) -> dict[tuple[int, int], Tensor]:
        """Derived tree: the output of every shared node, by ``(layer, index)``."""
        assert self.tree is not None
        owners = self._owners()
        outs: dict[tuple[int, int], Tensor] = {}
        for layer, nodes in enumerate(self.layers):
            for j, node in enumerate(nodes):
                if len(owners[layer][j]) > 1:
                    parent = x if layer == 0 else outs[(layer - 1, self.tree.parents[layer][j])]
                    outs[(layer, j)] = torch.relu(node(parent))
        return outs

    def _frontier_nodes(self) -> list[tuple[int, int]]:
        return sorted({f for f in self._frontier().values() if f is not None})

    def _derived_heads(
        self, start: Mapping[tuple[int, int], Tensor], x: Tensor | None
    ) -> dict[str, Tensor]:
        assert self.tree is not None
        out = {}
        for t, front in self._frontier().items():
            path = self.tree.path(t)
            if front is None:
                if x is None:
                    raise ValueError(
                        f"task {t!r} shares no node of the derived tree: heads(z, x) needs "
                        "the input x to run its own path"
                    )
                h, first = x, 0
            else:
                h, first = start[front], front[0] + 1
            for layer in range(first, len(self.layers)):
                h = torch.relu(self.layers[layer][path[layer]](h))
            out[t] = self.towers[t](h)
        return out

    # ------------------------------------------------------------------ forward
    def features(self, x: Tensor) -> Tensor | list[Tensor]:
        """Before :meth:`derive`: the last layer's outputs ``(B, N_L, D)``; after: the
        frontier nodes' outputs (module docstring)."""
        if self.tree is not None:
            fronts = self._frontier_nodes()
            if not fronts:
                raise ValueError(
                    "the derived tree shares no node between tasks: there is no shared "
                    "representation (and shared_parameters() is empty); train the tasks "
                    "without features= (each task's network is its own)"
                )
            outs = self._shared_outputs(x)
            return [outs[f] for f in fronts]
        layers, _ = self.branch_weights()
        return self._soft_body(x, layers)

    def _soft_body(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        prev = x.unsqueeze(1)  # (B, 1, in)
        for nodes, d in zip(self.layers, weights):
            if d.shape[1] == 1:
                inputs = prev.expand(-1, len(nodes), -1)
            else:
                inputs = torch.einsum("ji,biw->bjw", d, prev)
            prev = torch.stack([torch.relu(n(inputs[:, j])) for j, n in enumerate(nodes)], 1)
        return prev

    def heads(self, z: Tensor | Sequence[Tensor], x: Tensor | None = None) -> dict[str, Tensor]:
        """Task outputs from :meth:`features` (``x`` is needed only after :meth:`derive`,
        for a task that shares no node)."""
        if self.tree is not None:
            fronts = self._frontier_nodes()
            if isinstance(z, Tensor) or len(z) != len(fronts):
                raise ValueError(
                    f"the derived tree's heads take the list of {len(fronts)} frontier "
                    "outputs that features(x) returns"
                )
            return self._derived_heads(dict(zip(fronts, z)), x)
        if not isinstance(z, Tensor):
            raise ValueError("before derive(), heads(z) takes the tensor features(x) returns")
        _, tasks = self.branch_weights()
        return {t: self.towers[t](torch.einsum("i,biw->bw", tasks[t], z)) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.tree is not None:
            return self._derived_heads(self._shared_outputs(x), x)
        layers, tasks = self.branch_weights()
        z = self._soft_body(x, layers)
        return {t: self.towers[t](torch.einsum("i,biw->bw", tasks[t], z)) for t in self.tasks}

    # ------------------------------------------------------------------ parameter groups
    def branching_parameters(self) -> list[nn.Parameter]:
        """The branching logits (layers', then tasks'): for their own optimizer. Empty after
        :meth:`derive`."""
        return [*self.branch_logits.values(), *self.task_logits.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the branching logits: the network weights."""
        logits = {id(p) for p in self.branching_parameters()}
        return [p for p in self.parameters() if id(p) not in logits]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Task ``task``'s tower and head logits; after :meth:`derive` also the nodes on its
        path that no other task reaches."""
        own: list[nn.Parameter] = list(self.towers[task].parameters())
        if task in self.task_logits:
            own.append(self.task_logits[task])
        if self.tree is not None:
            for layer, owners in enumerate(self._owners()):
                for j, who in enumerate(owners):
                    if who == (task,):
                        own.extend(self.layers[layer][j].parameters())
        return unique(own)  # type: ignore[return-value]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters more than one task reaches (module docstring): every node and
        layer logit before :meth:`derive`, the nodes on two or more paths after."""
        own = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in own]
