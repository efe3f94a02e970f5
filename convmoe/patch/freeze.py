"""Parameter-efficient MoE fine-tuning: train the experts and routers of a patched model, freeze the rest.

```
freeze_base(model, train=("fc",), freeze_norm_stats=False) -> FreezeSummary
 ├─ every MoE block: experts, shared expert, router         requires_grad=True
 │    (low-rank experts: the deltas; their shared conv W0 stays frozen)
 ├─ modules named by `train` (names, globs, "re:" regexes)  requires_grad=True
 ├─ everything else                                         requires_grad=False
 └─ freeze_norm_stats: frozen norm layers held in eval mode (a forward pre-hook, so model.train() cannot undo it)
freeze_modules(model, ["conv_stem", "blocks.0"], freeze_norm_stats=False) -> FreezeSummary
 ├─ the named modules                                       requires_grad=False
 └─ everything else                                         unchanged (a dense model and its MoE twin alike)
print_trainable_parameters(model)   trainable params: 1,234 || all params: 5,678 || trainable%: 21.7324
```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from convmoe.diagnostics import moe_blocks
from convmoe.patch.inventory import model_modules
from convmoe.patch.targets import TargetSpec, _flatten, _match, describe_spec, no_match_hint

# The parts of an MoE block that fine-tuning trains; a user block without any of them trains whole.
_TRAINED_PARTS = ("experts", "shared_expert", "router")


@dataclass(frozen=True)
class FreezeSummary:
    """What :func:`freeze_base` or :func:`freeze_modules` left trainable. ``str(summary)`` is the line ``print_trainable_parameters`` prints.

    Attributes:
        moe_blocks: The MoE blocks whose experts, shared expert and router train.
        train_modules: The modules ``train`` named (they train whole).
        trainable: Names of the parameters that train.
        frozen: Names of the parameters that do not.
        frozen_norms: Norm layers held in eval mode (``freeze_norm_stats=True``; else empty).
        frozen_modules: The modules :func:`freeze_modules` froze (empty for :func:`freeze_base`).
        trainable_params: Elements of the trainable parameters.
        all_params: Elements of all parameters.

    Example:
        >>> summary = FreezeSummary(["layer4.0.conv2"], ["fc"], ["fc.weight"], ["conv1.weight"], [], 30, 120)
        >>> summary.trainable_percent
        25.0
    """

    moe_blocks: list[str]
    train_modules: list[str]
    trainable: list[str]
    frozen: list[str]
    frozen_norms: list[str]
    trainable_params: int
    all_params: int
    frozen_modules: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all (0 for a model without parameters)."""
        return 100 * self.trainable_params / self.all_params if self.all_params else 0.0

    def __str__(self) -> str:
        return _parameter_line(self.trainable_params, self.all_params)


def _parameter_line(trainable: int, total: int) -> str:
    # PEFT's PeftModel.print_trainable_parameters format, so logs compare at a glance.
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable and total parameter counts, in PEFT's format.

    Args:
        model: Any module; parameters shared between modules count once.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> model[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> print_trainable_parameters(model)
        trainable params: 10 || all params: 30 || trainable%: 33.3333
    """
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    print(_parameter_line(trainable, sum(p.numel() for p in parameters)))


def _keep_norm_stats_frozen(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen norm layer: back to eval mode, whatever ``model.train()`` did."""
    if module.training:
        module.eval()


def _hold_norm_stats(model: nn.Module, chosen: Callable[[nn.Module], bool]) -> list[str]:
    """Hold the ``chosen`` norm layers with running statistics in eval mode (a pre-hook keeps them there); their names."""
    held: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _NormBase) and module.track_running_stats and chosen(module):
            module.eval()
            hooks = module._forward_pre_hooks.values()
            if not any(hook is _keep_norm_stats_frozen for hook in hooks):
                module.register_forward_pre_hook(_keep_norm_stats_frozen)
            held.append(name)
    return held


def _remove_norm_hooks(model: nn.Module) -> None:
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [key for key, hook in hooks.items() if hook is _keep_norm_stats_frozen]:
            del hooks[key]


def _named_modules(model: nn.Module, specs: TargetSpec | None, what: str = "train",
                   caller: str = "freeze_base") -> list[str]:
    """Names of the modules ``specs`` match, each by patch's rules; a spec that matches none raises (``what``
    and ``caller`` name the argument and the function in the message)."""
    if specs is None or (isinstance(specs, (list, tuple)) and not specs):
        return []
    modules = model_modules(model)
    names = [name for name in modules if name]
    try:
        matches = [(spec, _match(spec, model, modules, what)) for spec in _flatten(specs, what)]
    except (TypeError, ValueError) as error:
        # patch's matcher words its errors for patch(); here they are the caller's.
        raise type(error)(str(error).replace("patch():", f"{caller}():", 1)) from None
    selected: dict[str, None] = {}
    for spec, matched in matches:
        if not matched:
            raise ValueError(f"{caller}(): {what} {describe_spec(spec)} matched no module; "
                             f"{no_match_hint(spec, modules, names, kind='modules')}.")
        selected.update(dict.fromkeys(matched))
    return list(selected)


def _shared_base(block: nn.Module) -> list[nn.Parameter]:
    """The pretrained conv low-rank experts keep (W0 and its bias): frozen like the rest of the base."""
    experts = getattr(block, "experts", None)
    if experts is None or not experts.capabilities.shared_base:
        return []
    return [p for p in experts.base_conv() if p is not None]


def freeze_base(model: nn.Module, train: TargetSpec | None = (), freeze_norm_stats: bool = False) -> FreezeSummary:
    """Freeze a patched model except its MoE experts and routers (and the modules in ``train``).

    Parameter-efficient fine-tuning of a pretrained model after :func:`convmoe.patch`: the experts,
    shared experts and routers of every MoE block and the modules ``train`` names (a new classifier
    or decoder) get ``requires_grad=True``, every other parameter ``requires_grad=False``. Low-rank
    experts (``experts="lowrank"``) train their deltas only: their shared conv W0 is the pretrained
    conv and stays frozen (mixture-of-LoRA fine-tuning), unless a ``train`` module contains it. Build the
    optimizer from the trainable parameters only (``filter(lambda p: p.requires_grad,
    model.parameters())``; the engine does this). Calling it again starts over: the second call's
    ``train`` and ``freeze_norm_stats`` replace the first's.

    Frozen norm layers still update their running statistics in training mode, as they would in the
    dense model, unless ``freeze_norm_stats=True``: then each frozen layer with running statistics
    (BatchNorm, SyncBatchNorm, InstanceNorm) is put in eval mode and a forward pre-hook puts it back
    before every forward pass, so ``model.train()`` cannot undo it. Norm layers inside the experts
    and the ``train`` modules are trainable parts and keep the model's mode. Apply it after
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` (which replaces the layers and drops their hooks)
    and before wrapping the model in ``DistributedDataParallel`` (which reads ``requires_grad``).

    Args:
        model: A model with MoE blocks (:func:`convmoe.patch` it first).
        train: Modules that train whole, by the rules of ``patch``'s targets: exact names, globs
            (``"decoder.*"``; ``*`` crosses dots), ``"re:"`` regular expressions, a module class, a
            predicate ``(name, module) -> bool``, or a list of these. A matched module trains with
            everything inside it.
        freeze_norm_stats: Hold the frozen norm layers in eval mode (their running statistics fixed).

    Returns:
        A :class:`FreezeSummary`; nothing is printed (see :func:`print_trainable_parameters`).

    Raises:
        ValueError: The model has no MoE block; a ``train`` spec matches no module (the message
            names the closest module names).
        TypeError: A ``train`` spec of an unsupported type.

    Example:
        >>> import timm, torch
        >>> import convmoe
        >>> model = timm.create_model("test_resnet")
        >>> _ = convmoe.patch(model, targets="last_stage", config=convmoe.MoEConfig(num_experts=4, top_k=1))
        >>> summary = freeze_base(model, train="fc")
        >>> summary.moe_blocks, summary.train_modules
        (['layer4.0.conv1', 'layer4.0.conv2'], ['fc'])
        >>> print(summary)  # 4 experts each: the experts outweigh the frozen rest of a tiny model
        trainable params: 1,093,488 || all params: 1,217,344 || trainable%: 89.8257
        >>> optimizer = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=0.1)
    """
    blocks = list(moe_blocks(model))
    if not blocks:
        raise ValueError("freeze_base(): the model has no MoE block, so nothing would train; patch it first, e.g. "
                         "convmoe.patch(model, targets='last_stage'), then call freeze_base.")
    train_names = _named_modules(model, train)

    modules = dict(model.named_modules())
    trained_modules: list[nn.Module] = []
    for _, block in blocks:
        parts = [getattr(block, part, None) for part in _TRAINED_PARTS]
        parts = [part for part in parts if isinstance(part, nn.Module)]
        trained_modules += parts or [block]
    trained_modules += [modules[name] for name in train_names]
    trained_ids = {id(p) for module in trained_modules for p in module.parameters()}
    trained_ids -= {id(p) for _, block in blocks for p in _shared_base(block)}
    trained_ids |= {id(p) for name in train_names for p in modules[name].parameters()}

    trainable: list[str] = []
    frozen: list[str] = []
    trainable_params = all_params = 0
    for name, parameter in model.named_parameters():
        keep = id(parameter) in trained_ids
        parameter.requires_grad_(keep)
        (trainable if keep else frozen).append(name)
        all_params += parameter.numel()
        trainable_params += parameter.numel() if keep else 0

    _remove_norm_hooks(model)
    frozen_norms: list[str] = []
    if freeze_norm_stats:
        inside_trained = {id(m) for module in trained_modules for m in module.modules()}
        frozen_norms = _hold_norm_stats(model, lambda module: id(module) not in inside_trained)
    return FreezeSummary([name for name, _ in blocks], train_names, trainable, frozen, frozen_norms,
                         trainable_params, all_params)


def freeze_modules(model: nn.Module, modules: TargetSpec, freeze_norm_stats: bool = False) -> FreezeSummary:
    """Freeze the named modules of any model, dense or patched; every other parameter is left as it is.

    The counterpart of timm's ``freeze``: the way to give a model and its dense twin the same frozen
    stages (``freeze_base`` needs MoE blocks; this does not). Parameters inside the matched modules get
    ``requires_grad=False``; with ``freeze_norm_stats=True`` their norm layers with running statistics
    are held in eval mode as in :func:`freeze_base`. A frozen prefix of a network costs no backward pass:
    autograd stops at the first trainable layer. It composes with :func:`freeze_base` called first
    (which starts over when called again).

    Args:
        model: Any module.
        modules: What to freeze, by the rules of ``patch``'s targets: exact names, globs, ``"re:"``
            regular expressions, a module class, a predicate, or a list of these.
        freeze_norm_stats: Hold the frozen modules' norm layers in eval mode (their statistics fixed).

    Returns:
        A :class:`FreezeSummary` of the whole model after the call (``frozen_modules`` the matched names).

    Raises:
        ValueError: ``modules`` is empty, or a spec matches no module (the message names the closest names).
        TypeError: A spec of an unsupported type.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
        >>> summary = freeze_modules(model, ["0", "1"], freeze_norm_stats=True)
        >>> summary.frozen_modules, summary.trainable, summary.frozen_norms
        (['0', '1'], ['2.weight', '2.bias'], ['1'])
        >>> _ = model.train()(torch.randn(1, 3, 8, 8))
        >>> model[1].training  # put back in eval mode before its forward
        False
    """
    names = _named_modules(model, modules, what="modules", caller="freeze_modules")
    if not names:
        raise ValueError("freeze_modules(): no module named; pass the modules to freeze, e.g. ['conv_stem', 'blocks.0'].")
    by_name = dict(model.named_modules())
    for name in names:
        by_name[name].requires_grad_(False)
    if freeze_norm_stats:
        inside = {id(m) for name in names for m in by_name[name].modules()}
        _hold_norm_stats(model, lambda module: id(module) in inside)
    held = [name for name, module in model.named_modules()
            if any(hook is _keep_norm_stats_frozen for hook in module._forward_pre_hooks.values())]
    named = list(model.named_parameters())
    trainable = [name for name, p in named if p.requires_grad]
    total = sum(p.numel() for _, p in named)
    return FreezeSummary([], [], trainable, [name for name, p in named if not p.requires_grad], held,
                         sum(p.numel() for _, p in named if p.requires_grad), total, names)
