"""Forward scopes: which side outputs (aux losses, routings) belong to a model's current forward pass.

An MoE block keeps its balancing losses and routing on the side (``block.last_aux``), where
``convmoe.aux_loss`` and ``convmoe.routing_stats`` collect them. A scope is a pair of hooks on the
module the user calls (the model)::

    model(x)
     ├─ scope enter (forward pre-hook)    reset every MoE block inside, mark them open
     ├─ forward: each block call adds      aux total and routing of this call (a block called
     │  to the current pass                twice, e.g. a shared FPN head, adds both calls)
     └─ scope exit (forward hook, always)  close them; on the first training pass after ``patch``,
                                           warn about blocks that did not run

So after ``model(x)`` the blocks that did not run hold nothing (a layer skipped by layer drop or an
early exit adds no stale loss), and a block called N times holds all N calls. A block called
outside any scope (``block(x)`` on its own) replaces its state at every call.

``convmoe.patch`` adds the scope to the patched model (``unpatch`` removes it); ``aux_loss`` and
``routing_stats`` add it to a model that has none (a model built from ``MoEConv2d`` directly), so
counting is per forward pass from the second pass on. The hooks are plain attributes of the module:
no ``state_dict`` key; they travel with ``copy.deepcopy`` and pickle, run outside the graph under
``torch.compile(model)`` and inside it when a function calling the model is compiled. Nested scopes
(a scoped backbone inside a scoped model) leave the work to the outermost one.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convmoe.recording import is_recording

__all__ = ["ForwardScope", "ScopedModule", "add_forward_scope", "ensure_forward_scope", "get_forward_scope",
           "leaving_no_trace", "remove_forward_scope"]


class ScopedModule:
    """The contract of a module whose side outputs belong to one forward pass (a mixin of ``MoEConv2d``).

    A :class:`ForwardScope` calls :meth:`reset_forward_state` when the model's forward pass starts
    and sets ``forward_scope_open`` while it runs. An open module adds each call to the current
    pass; a closed one (called on its own) starts afresh at every call.

    Example:
        >>> from convmoe import MoEConv2d
        >>> isinstance(MoEConv2d(4, 4, 1), ScopedModule)
        True
    """

    forward_scope_open: bool = False

    def reset_forward_state(self) -> None:
        """Forget the side outputs of the previous forward pass."""
        raise NotImplementedError

    @property
    def forward_calls(self) -> int:
        """How many times the module ran in the current forward pass."""
        raise NotImplementedError

    def forward_state(self) -> Any:
        """The side outputs of the current forward pass, for :meth:`restore_forward_state`."""
        raise NotImplementedError

    def restore_forward_state(self, state: Any) -> None:
        """Put back side outputs taken by :meth:`forward_state`."""
        raise NotImplementedError


# Bumped whenever any module gets a submodule: a scope's cached list of blocks is then rebuilt, so a
# forward pass walks the module tree only after the tree changed (patch, a replaced head).
_TREE_VERSION = [0]


def _module_registered(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _TREE_VERSION[0] += 1


nn.modules.module.register_module_module_registration_hook(_module_registered)


class ForwardScope:
    """The hooks that delimit one forward pass of a model (see the module docstring).

    Args:
        check_unused: Warn once, after the first training forward pass, about scoped modules
            that did not run (``convmoe.patch`` sets it).

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(4, 4, 1, num_experts=2))
        >>> scope = add_forward_scope(model)
        >>> get_forward_scope(model) is scope
        True
    """

    def __init__(self, check_unused: bool = False) -> None:
        self.check_unused = check_unused
        self.opened: list[nn.Module] = []
        self._scoped: list[ScopedModule] | None = None
        self._version = -1
        self._handled_at_entry: BaseException | None = None

    def scoped_modules(self, module: nn.Module) -> list[ScopedModule]:
        """The scoped modules inside ``module`` (cached until a module anywhere gets a new submodule)."""
        if self._scoped is None or self._version != _TREE_VERSION[0]:
            self._scoped = [inner for inner in module.modules() if isinstance(inner, ScopedModule)]
            self._version = _TREE_VERSION[0]
        return self._scoped

    def enter(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: reset and open the scoped modules that no outer scope has opened."""
        self.close()  # after an exception under torch.compile the exit hook may not have run
        self._handled_at_entry = sys.exc_info()[1]  # a caller's except block the pass runs in is no failure
        for inner in self.scoped_modules(module):
            if not inner.forward_scope_open:
                inner.reset_forward_state()
                inner.forward_scope_open = True
                self.opened.append(inner)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook (also called when the forward pass raises): close what :meth:`enter` opened.

        A pass that raised says nothing about unused blocks: the check waits for a pass that finishes.
        """
        raised = sys.exc_info()[1] not in (None, getattr(self, "_handled_at_entry", None))
        if self.check_unused and module.training and self.opened and not raised:
            self.check_unused = False
            unused = [name for name, inner in module.named_modules()
                      if isinstance(inner, ScopedModule) and inner.forward_calls == 0]
            if unused:
                warnings.warn(_unused_message(unused, type(module).__name__), UserWarning, stacklevel=_caller_level())
        self.close()

    def close(self) -> None:
        """Close the modules this scope opened."""
        for inner in self.opened:
            inner.forward_scope_open = False
        self.opened = []

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) finds its own modules again.
        return {**self.__dict__, "_scoped": None, "_version": -1, "opened": [], "_handled_at_entry": None}


def _caller_level() -> int:
    """The stacklevel of the first frame outside this file and torch's module call machinery (the model's caller)."""
    level, frame = 1, sys._getframe(1)
    internal = (str(Path(__file__)), str(Path(nn.Module.__call__.__code__.co_filename)))
    while frame is not None and frame.f_code.co_filename in internal:
        level, frame = level + 1, frame.f_back
    return level


UNUSED_FIX = ("Choose targets the forward pass uses (another placement or other names), or a model option that "
              "runs them (e.g. smp's encoder_depth keeps the deeper encoder stages).")


def _unused_message(names: list[str], model: str) -> str:
    shown = ", ".join(repr(name) for name in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"convmoe: {len(names)} MoE block(s) did not run in the first training forward pass of {model}: {shown}; "
            f"they get no routing, aux loss or gradient. {UNUSED_FIX} convmoe.patch(..., example_inputs=x) checks "
            "this when patching; blocks skipped on purpose (layer drop, early exit) can be ignored.")


@contextmanager
def leaving_no_trace(model: nn.Module) -> Iterator[None]:
    """Look at ``model`` (a probe forward pass, a model built beside it) without a trace on the caller's run.

    Inside: no gradient. On exit, even after an error: every module's training flag, the scoped
    modules' side outputs of the last forward pass (the aux loss the caller has yet to add) and the
    random number generators (CPU, and the GPUs ``model`` is on) are as they were.

    Example:
        >>> from convmoe import MoEConv2d, aux_loss
        >>> model = nn.Sequential(MoEConv2d(4, 4, 1, num_experts=2))
        >>> _ = add_forward_scope(model)
        >>> loss = model(torch.randn(2, 4, 3, 3)).sum()
        >>> before = aux_loss(model)
        >>> with leaving_no_trace(model):
        ...     _ = model.eval()(torch.randn(1, 4, 3, 3))
        >>> model.training, bool(aux_loss(model) == before)
        (True, True)
    """
    modes = [(module, module.training) for module in model.modules()]
    states = [(module, module.forward_state()) for module in model.modules() if isinstance(module, ScopedModule)]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        for module, state in states:
            module.restore_forward_state(state)


def get_forward_scope(model: nn.Module) -> ForwardScope | None:
    """The scope installed on ``model`` itself, or None.

    Example:
        >>> get_forward_scope(nn.Conv2d(1, 1, 1)) is None
        True
    """
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, ForwardScope):
            return owner
    return None


def add_forward_scope(model: nn.Module, check_unused: bool = False) -> ForwardScope:
    """Install a scope on ``model`` (the module the user calls); an existing one is kept and returned.

    Args:
        model: The model, or its ``DistributedDataParallel`` / ``torch.compile`` wrapper.
        check_unused: Warn once, after the next training forward pass, about blocks that did not run.

    Returns:
        The scope.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(4, 4, 1, num_experts=2))
        >>> add_forward_scope(model) is add_forward_scope(model)
        True
    """
    scope = get_forward_scope(model)
    if scope is None:
        scope = ForwardScope(check_unused)
        model.register_forward_pre_hook(scope.enter, prepend=True)
        model.register_forward_hook(scope.exit, always_call=True)
    elif check_unused:
        scope.check_unused = True
    return scope


def ensure_forward_scope(model: nn.Module) -> None:
    """Install a scope on ``model`` unless it has one or a tracer is running (a hook cannot be added there).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 1, 1))
        >>> ensure_forward_scope(model)
        >>> get_forward_scope(model) is not None
        True
    """
    if is_recording():
        return
    if get_forward_scope(model) is None:
        add_forward_scope(model)


def remove_forward_scope(model: nn.Module) -> bool:
    """Remove the scope from ``model``; True when there was one.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 1, 1))
        >>> _ = add_forward_scope(model)
        >>> remove_forward_scope(model), get_forward_scope(model)
        (True, None)
    """
    removed = False
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for hook_id, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), ForwardScope):
                del hooks[hook_id]
                model._forward_hooks_always_called.pop(hook_id, None)
                removed = True
    return removed

