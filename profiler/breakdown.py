"""Per-operator breakdown of the activations saved for backward.

Every tensor an autograd node saves (``save_for_backward`` in custom Functions, the generated
formulas of built-in ops) is attributed to an operator of the WTA-CRS figure
(``wtacrs.taxonomy.Operator``) and a category (``Category``), deduplicated by storage, with
parameter and buffer storages excluded. Two facts decide the attribution:

- *which module saved it*: a ``saved_tensors_hooks`` pack hook notes the innermost module with a
  role (a Linear of the family table, an attention module, a LayerNorm, a Dropout, an activation,
  an Embedding, the head or loss) from torch's ``ModuleTracker``;
- *which autograd node saved it*: after the forward, a walk over the graph lists every node's
  saved tensors. Pack events of a storage are matched to the nodes that save it in creation order
  (a pack hook fires while its node is built, before the op runs for inputs and after for
  outputs, so the node, not the last op, is the reliable witness).

The wtacrs autograd Functions declare what they save (:func:`declared_attribution`): class
attributes ``operator`` (None for a matmul whose operator the calling module decides) and
``category``, optionally ``saved_operators`` (slot index -> ``(Operator, Category)``) for slots
that belong to another operator, and ``ctx.category`` where the category depends on the call.
For built-in nodes, ``SAVER_RULES`` maps a node class name to a small function of the save site,
registered with ``@register_saver`` (in the manner of
``torch.utils.flop_counter.register_flop_formula``). A rule returns ``(Operator, Category)`` or
None to fall back on the module's role.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.module_tracker import ModuleTracker

from wtacrs.taxonomy import Category, Family, Operator, is_head

from .tracker import StorageTracker

Attribution = tuple[Operator, Category]


@dataclass(frozen=True)
class ModuleRole:
    """What a module is in the block. ``kind``: linear | attention | layernorm | dropout |
    activation | embedding | head, or "" for none. ``operator`` is set for linears."""

    kind: str
    path: str
    operator: Operator | None = None


NO_ROLE = ModuleRole("", "Global")


@dataclass(frozen=True)
class SaveSite:
    """One saved tensor as an attribution rule sees it.

    ``node``: the saving autograd node's class name (``MmBackward0``, ``SampledLinearBackward``).
    ``slot``: the saved attribute (``self``, ``mat2``, ``result``, ``query``, ``saved_tensors[0]``).
    ``role``: the innermost module with a role when the tensor was packed.
    ``random_mask``: the storage was filled by a random op (a composite dropout's mask).
    ``call_index``: the node's rank among matmul nodes of the same attention module, in forward
    order (0 for ``Q K^T``, 1 for ``P V``).
    ``declared``: what the node's wtacrs op declares for this slot (:func:`declared_attribution`),
    None for built-in nodes.
    """

    node: str
    slot: str
    role: ModuleRole
    random_mask: bool = False
    call_index: int = 0
    declared: tuple[Operator | None, Category] | None = None

    @property
    def category(self) -> Category:
        return Category.UNCOMPRESSED if self.declared is None else self.declared[1]


@dataclass(frozen=True)
class SavedActivation:
    """One deduplicated saved storage: ``nbytes`` is the whole storage, ``node``/``slot``/``path``
    say where it was first saved."""

    operator: Operator
    category: Category
    nbytes: int
    node: str
    slot: str
    path: str


# -- the registry ---------------------------------------------------------------------------------
SAVER_RULES: dict[str, Callable[[SaveSite], Attribution | None]] = {}

ROLE_OPERATORS: dict[str, Operator] = {
    "layernorm": Operator.LAYERNORM,
    "dropout": Operator.DROPOUT,
    "activation": Operator.ACTIVATION,
    "embedding": Operator.EMBEDDING,
    "head": Operator.HEAD_LOSS,
}

MATMUL_NODES = (
    "MmBackward0",
    "AddmmBackward0",
    "BmmBackward0",
    "BaddbmmBackward0",
    "MvBackward0",
    "DotBackward0",
)


def register_saver(*node_names: str):
    """Register ``rule(site) -> (Operator, Category) | None`` for autograd nodes of these names."""

    def decorator(rule: Callable[[SaveSite], Attribution | None]):
        for name in node_names:
            SAVER_RULES[name] = rule
        return rule

    return decorator


def declared_attribution(node, slot: str) -> tuple[Operator | None, Category] | None:
    """``(operator, category)`` the forward class of a custom Function ``node`` declares for
    ``slot`` (``saved_tensors[i]``), or None when it declares nothing (built-in nodes, other
    libraries' Functions). The operator is None for a matmul the calling module names."""
    op = getattr(type(node), "_forward_cls", None)
    category = getattr(op, "category", None)
    if not isinstance(category, Category):
        return None
    per_slot = getattr(op, "saved_operators", {})
    index = int(slot[len("saved_tensors[") : -1]) if slot.startswith("saved_tensors[") else None
    if index in per_slot:
        return per_slot[index]
    return op.operator, getattr(node, "category", category)


def _is_matmul(name: str, declared: tuple[Operator | None, Category] | None) -> bool:
    return name in MATMUL_NODES if declared is None else declared[0] is None


@register_saver(*MATMUL_NODES)
def _matmul(site: SaveSite) -> Attribution | None:
    category = site.category
    if site.role.kind == "linear" and site.role.operator is not None:
        return site.role.operator, category
    if site.role.kind == "attention":
        return (Operator.TENSORMUL_1 if site.call_index % 2 == 0 else Operator.TENSORMUL_2), category
    if site.role.kind == "head":
        return Operator.HEAD_LOSS, category
    return None


@register_saver(
    "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductEfficientAttentionBackward0",
    "ScaledDotProductCudnnAttentionBackward0",
)
def _fused_attention(site: SaveSite) -> Attribution:
    # Fused attention keeps Q, K, V, its output and the log-sum-exp, and recomputes P in backward.
    slot_operators = {
        "query": Operator.TENSORMUL_1,
        "key": Operator.TENSORMUL_1,
        "value": Operator.TENSORMUL_2,
        "output": Operator.TENSORMUL_2,
        "out": Operator.TENSORMUL_2,
        "logsumexp": Operator.SOFTMAX,
    }
    return slot_operators.get(site.slot, Operator.OTHER), Category.UNCOMPRESSED


@register_saver("SoftmaxBackward0")
def _softmax(site: SaveSite) -> Attribution:
    return (Operator.HEAD_LOSS if site.role.kind == "head" else Operator.SOFTMAX), Category.UNCOMPRESSED


@register_saver("LogSoftmaxBackward0", "NllLossBackward0", "NllLoss2DBackward0", "BinaryCrossEntropyWithLogitsBackward0")
def _loss(site: SaveSite) -> Attribution:
    return Operator.HEAD_LOSS, Category.UNCOMPRESSED


@register_saver("TanhBackward0")
def _tanh(site: SaveSite) -> Attribution | None:
    # inside attention, a tanh is logit softcapping (Gemma 2): part of the scores' normalisation
    return (Operator.SOFTMAX, Category.UNCOMPRESSED) if site.role.kind == "attention" else None


@register_saver("NativeDropoutBackward0")
def _dropout(site: SaveSite) -> Attribution:
    return Operator.DROPOUT, Category.UNCOMPRESSED


@register_saver("ReluBackward0", "ThresholdBackward0", "GeluBackward0", "SiluBackward0")
def _activation(site: SaveSite) -> Attribution:
    return Operator.ACTIVATION, Category.UNCOMPRESSED


@register_saver("NativeLayerNormBackward0", "NativeGroupNormBackward0", "FusedRmsNormBackward0")
def _layernorm(site: SaveSite) -> Attribution:
    return Operator.LAYERNORM, Category.UNCOMPRESSED


@register_saver("EmbeddingBackward0", "EmbeddingDenseBackward0")
def _embedding(site: SaveSite) -> Attribution:
    return Operator.EMBEDDING, Category.UNCOMPRESSED


def attribute(site: SaveSite) -> Attribution:
    """The operator and category of one saved tensor: random masks are dropout, then what the
    node's op declares or the node's rule, then the module's role."""
    if site.random_mask:
        return Operator.DROPOUT, site.category
    if site.declared is not None and site.declared[0] is not None:
        return site.declared
    rule = _matmul if site.declared is not None else SAVER_RULES.get(site.node)
    attribution = rule(site) if rule is not None else None
    if attribution is not None:
        return attribution
    if site.role.kind == "linear" and site.role.operator is not None:
        return site.role.operator, site.category
    return ROLE_OPERATORS.get(site.role.kind, Operator.OTHER), site.category


# -- module roles ---------------------------------------------------------------------------------
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")
_NOT_ACTIVATIONS = (nn.Softmax, nn.LogSoftmax, nn.MultiheadAttention)


class ModuleRoles:
    """Roles of modules by their ``ModuleTracker`` name (root class name, then the qualified name).

    Modules called in forward without being registered (a loss built on the fly) are known by
    their class name only.
    """

    def __init__(self, model: nn.Module, family: Family | None) -> None:
        root = type(model).__name__
        self._modules = {(f"{root}.{name}" if name else root): m for name, m in model.named_modules(remove_duplicate=False)}
        self._family = family
        self._cache: dict[str, ModuleRole | None] = {}

    def role_of(self, name: str) -> ModuleRole | None:
        if name not in self._cache:
            self._cache[name] = self._resolve(name)
        return self._cache[name]

    def innermost(self, active: Iterable[str]) -> ModuleRole:
        """The role of the innermost active module that has one (names nest, so longest first)."""
        for name in sorted(active, key=len, reverse=True):
            role = self.role_of(name)
            if role is not None:
                return role
        return NO_ROLE

    def _resolve(self, name: str) -> ModuleRole | None:
        module = self._modules.get(name)
        type_name = type(module).__name__ if module is not None else name.rsplit(".", 1)[-1]
        family = self._family
        if family is not None:
            operator = family.linear_operator(name)
            if operator is not None:
                return ModuleRole("linear", name, operator)
            if family.is_attention(name):
                return ModuleRole("attention", name)
            if family.is_layernorm(name):
                return ModuleRole("layernorm", name)
        if isinstance(module, nn.Dropout):
            return ModuleRole("dropout", name)
        if isinstance(module, nn.Embedding):
            return ModuleRole("embedding", name)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "LayerNorm" in type_name or "RMSNorm" in type_name:
            return ModuleRole("layernorm", name)
        if module is not None and (
            (type(module).__module__ in _ACTIVATION_MODULES and not isinstance(module, _NOT_ACTIVATIONS))
            or (family is not None and family.is_activation(module))
        ):
            return ModuleRole("activation", name)
        if (family.is_head(name) if family is not None else is_head(name)) or type_name.endswith(("Loss", "Head")):
            return ModuleRole("head", name)
        return None


# -- the breakdown --------------------------------------------------------------------------------
class _PackedStorage:
    __slots__ = ("consumed", "nbytes", "random", "record_key", "ref", "roles")

    def __init__(self, storage: torch.UntypedStorage, random: bool, record_key: int | None) -> None:
        self.ref = weakref.ref(storage)
        self.nbytes = storage.nbytes()
        self.random = random
        self.record_key = record_key
        self.roles: list[ModuleRole] = []  # one per pack event, in order
        self.consumed = 0


class SavedActivationBreakdown:
    """Context manager around a forward pass; ``attribute(outputs)`` then lists what it saved.

    Usage::

        with SavedActivationBreakdown(model, family_of(model), tracker=tracker) as breakdown:
            loss = model(**batch).loss
        breakdown.attribute(loss)   # before backward frees the graph
        breakdown.by_operator()     # [{"operator", "category", "bytes"}, ...]

    Contract:
    - ``saved`` lists one ``SavedActivation`` per storage saved for backward during the block and
      reachable from ``outputs``, parameter and buffer storages excluded; bytes are whole storages
      (``untyped_storage().nbytes()``, not rounded).
    - ``tracker`` (a ``StorageTracker`` active around the forward) tells which storages come from
      random ops, and ``saved_record_keys()`` names the saved storages in its records. Without one,
      the breakdown runs its own tracker during the block.

    Leaves no trace: the pack hooks and ``ModuleTracker`` hooks are removed on exit; the pack hook
    returns a detached alias, so the graph holds no reference cycle through saved outputs.

    Limitations:
    - Tensors stashed on ``ctx`` attributes instead of ``save_for_backward`` are invisible.
    - Activation checkpointing: what a checkpointed region saves is packed by checkpoint's own
      hooks, recomputed in backward, and not listed (it is never read here: unpacking it would
      recompute the region). What checkpoint keeps -- each region's inputs, saved by a node that
      is not reachable from ``outputs`` (non-reentrant) or by ``CheckpointFunctionBackward``
      (reentrant) -- is listed, as ``Other`` unless the region's caller has a role.
    - Storages saved by nodes not reachable from ``outputs`` are attributed by module role alone.
    """

    def __init__(self, model: nn.Module, family: Family | None, *, tracker: StorageTracker | None = None) -> None:
        self.model = model
        self.roles = ModuleRoles(model, family)
        self.saved: list[SavedActivation] = []
        self._tracker = tracker
        self._own_tracker: StorageTracker | None = None
        self._module_tracker: ModuleTracker | None = None
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._packed: dict[int, _PackedStorage] = {}  # id(untyped storage) -> pack events
        self._parameter_ids: set[int] = set()

    def __enter__(self) -> SavedActivationBreakdown:
        # model state is not an activation: parameters and buffers (a buffer such as BERT's
        # position_ids is saved as embedding indices, but it existed before the step)
        self._parameter_ids = {id(t.untyped_storage()) for t in (*self.model.parameters(), *self.model.buffers())}
        self._packed = {}
        self.saved = []
        if self._tracker is None:
            device_types = {p.device.type for p in self.model.parameters()} or {"cpu"}
            self._own_tracker = StorageTracker(device_types)
            self._own_tracker.__enter__()
        self._module_tracker = ModuleTracker().__enter__()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._module_tracker.__exit__(*exc)
        if self._own_tracker is not None:
            self._own_tracker.__exit__(*exc)
        self._hooks = self._module_tracker = None

    @property
    def tracker(self) -> StorageTracker:
        return self._tracker or self._own_tracker

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sid = id(storage)
        if sid in self._parameter_ids:
            return tensor
        packed = self._packed.get(sid)
        if packed is None:
            record = self.tracker.record_of(storage)
            packed = _PackedStorage(
                storage, random=record is not None and record.random, record_key=None if record is None else record.key
            )
            self._packed[sid] = packed
        packed.roles.append(self.roles.innermost(self._module_tracker.parents))
        return tensor.detach()

    # -- attribution ------------------------------------------------------------------------------
    def attribute(self, outputs: torch.Tensor | Iterable[torch.Tensor]) -> list[SavedActivation]:
        """Walk the graph behind ``outputs`` and attribute every saved storage (call before backward)."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        attention_matmuls: dict[str, int] = {}
        attributed: set[int] = set()
        self.saved = []
        for node in sorted(_graph_nodes(outputs), key=lambda n: n._sequence_nr()):
            name = node.name()
            matmul_rank: int | None = None
            for slot, tensor in _saved_slots(node):
                sid = id(tensor.untyped_storage())
                packed = self._packed.get(sid)
                if packed is None:  # a parameter, or a tensor saved outside the block
                    continue
                role = packed.roles[min(packed.consumed, len(packed.roles) - 1)]
                packed.consumed += 1
                declared = declared_attribution(node, slot)
                if _is_matmul(name, declared) and role.kind == "attention" and matmul_rank is None:
                    matmul_rank = attention_matmuls.get(role.path, 0)
                    attention_matmuls[role.path] = matmul_rank + 1
                if sid in attributed:
                    continue
                attributed.add(sid)
                site = SaveSite(name, slot, role, packed.random, matmul_rank or 0, declared)
                operator, category = attribute(site)
                self.saved.append(SavedActivation(operator, category, packed.nbytes, name, slot, role.path))
        for sid, packed in self._packed.items():
            if sid not in attributed and packed.ref() is not None:
                role = packed.roles[0]
                operator, category = attribute(SaveSite("", "", role, packed.random))
                self.saved.append(SavedActivation(operator, category, packed.nbytes, "", "", role.path))
                attributed.add(sid)
        return self.saved

    def saved_record_keys(self) -> set[int]:
        """Keys (in the tracker's records) of every storage packed during the block."""
        return {p.record_key for p in self._packed.values() if p.record_key is not None}

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved)

    def by_operator(self) -> list[dict]:
        """``[{"operator", "category", "bytes"}]`` summed per (operator, category), in taxonomy order."""
        totals: dict[tuple[Operator, Category], int] = {}
        for s in self.saved:
            totals[(s.operator, s.category)] = totals.get((s.operator, s.category), 0) + s.nbytes
        order = {op: i for i, op in enumerate(Operator)}
        corder = {c: i for i, c in enumerate(Category)}
        return [
            {"operator": op.value, "category": cat.value, "bytes": n}
            for (op, cat), n in sorted(totals.items(), key=lambda kv: (order[kv[0][0]], corder[kv[0][1]]))
        ]


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _graph_nodes(outputs: Iterable[torch.Tensor]) -> list:
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set = set()
    nodes = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


_SLOT_NAMES: dict[type, tuple[str, ...]] = {}
# torch >= 2.5 exposes the packed object of a saved tensor (``SavedTensor.data``) and its unpack
# hook without running the hook; older builds can only unpack.
_PEEKABLE = hasattr(torch._C._autograd.SavedTensor, "data") and hasattr(torch._C._autograd.SavedTensor, "unpack_hook")


def _saved_slots(node) -> Iterator[tuple[str, torch.Tensor]]:
    """(slot name, tensor) for every tensor the node saved through this module's pack hook.

    Never runs another pack/unpack pair's unpack hook: non-reentrant activation checkpointing
    packs the tensors of its region into holders whose unpack *recomputes the whole region*
    (outside backward with a fresh graph id each time, keeping every recomputation alive as long
    as the graph). Those slots were not packed by the breakdown's hook, so they are skipped
    unread; the tensors checkpoint keeps (its inputs) are packed by the breakdown's hook outside
    the region and are listed from ``_packed``.
    """
    names = _SLOT_NAMES.get(type(node))
    if names is None:
        names = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
        _SLOT_NAMES[type(node)] = names
    for attr in names:
        # a custom Function's ``_raw_saved_tensors`` are its ``saved_tensors``
        slot = "saved_tensors" if attr == "_raw_saved_tensors" else attr[len("_raw_saved_") :]
        value = getattr(node, attr)
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                tensor = _peek(node, slot, item, i)
                if tensor is not None:
                    yield f"{slot}[{i}]", tensor
        else:
            tensor = _peek(node, slot, value, None)
            if tensor is not None:
                yield slot, tensor


def _peek(node, slot: str, saved, index: int | None) -> torch.Tensor | None:
    """The tensor our pack hook stored in ``saved`` (a ``SavedTensor``), or None for any other."""
    if _PEEKABLE:
        if saved is None or saved.unpack_hook is not _unpack:
            return None
        data = saved.data
        return data if isinstance(data, torch.Tensor) else None
    # old torch: unpacking is the only way in (a checkpointed region will be recomputed)
    value = node.saved_tensors if slot == "saved_tensors" else getattr(node, f"_saved_{slot}")
    if index is not None:
        value = value[index]
    return value if isinstance(value, torch.Tensor) else None
