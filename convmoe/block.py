"""MoEConv2d: a sparse Mixture-of-Experts block that is a drop-in for nn.Conv2d."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.config import MoEConfig
from convmoe.dispatch import DenseDispatcher, SparseDispatcher, create_dispatcher
from convmoe.dispatch.base import add_shared_base
from convmoe.dropout import create_dropout
from convmoe.experts import create_experts
from convmoe.export import export_dispatcher, is_exporting
from convmoe.geometry import ConvGeometry
from convmoe.losses import BalancingLoss
from convmoe.routers import create_router
from convmoe.scope import ScopedModule
from convmoe.tokens import create_tokens
from convmoe.types import AuxOutput, Routing

_DENSE = DenseDispatcher()


def _detached(routing: Routing) -> Routing:
    return dataclasses.replace(routing, **{
        f.name: getattr(routing, f.name).detach()
        for f in dataclasses.fields(routing) if isinstance(getattr(routing, f.name), Tensor)
    })


def _added(first: AuxOutput, second: AuxOutput) -> AuxOutput:
    """The losses of two calls of one block in one forward pass: totals and terms add."""
    terms = {name: term + second.terms[name] if name in second.terms else term for name, term in first.terms.items()}
    terms.update({name: term for name, term in second.terms.items() if name not in first.terms})
    return AuxOutput(first.total + second.total, terms, {**first.weights, **second.weights})


class MoEConv2d(nn.Module, ScopedModule):
    """A Mixture-of-Experts convolution with the call and output shape of ``nn.Conv2d``.

    The forward pass, B batch, N tokens, E experts, k experts per token::

        x (B, C_in, H, W) -> pad -> tokens.split          which output regions route together
                          -> router(tokens)               which experts, with what weight (float32)
                          -> dispatcher(experts)          dense reference or sparse gather/scatter
                          (+ shared base, shared expert)  -> y (B, C_out, H_out, W_out)
        on the side: last_aux (balancing losses, training with autograd only), last_routing (for routing_stats)

    Side outputs cover the model's current forward pass (see :mod:`convmoe.scope`): ``last_aux`` is
    the sum over every call of the block in that pass (a head shared by FPN levels runs once per
    level), ``forward_routings`` holds each call's routing and ``last_routing`` the latest one. A
    block that did not run in the pass holds None. Called on its own (no scope), each call replaces
    the last.

    Balancing losses are computed only in training mode with autograd enabled: in eval mode or under
    ``torch.no_grad()`` ``last_aux`` holds a zero total and no terms (so ``convmoe.aux_loss`` is 0),
    which keeps the losses' cost out of inference. The routing is kept in every mode; routing
    statistics are computed from it only when ``convmoe.routing_stats`` asks.

    Args:
        in_channels: Input channels C_in, as in ``nn.Conv2d``.
        out_channels: Output channels C_out.
        kernel_size: Kernel size of every expert.
        stride: Stride.
        padding: An int, a pair, ``"same"`` or ``"valid"``, as in ``nn.Conv2d``; or ``"dynamic_same"``:
            TensorFlow 'SAME', computed from each input's size (timm's ``Conv2dSame``).
        dilation: Dilation.
        groups: Conv groups (``in_channels`` for a depthwise conv).
        bias: Whether every expert has a bias.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        config: The MoE settings (default ``MoEConfig()``); a dict is read with ``MoEConfig.from_dict``.
        device: Device of the parameters (``"meta"`` builds the experts without memory).
        dtype: Dtype of the parameters.
        **overrides: Fields of ``config`` to change, e.g. ``num_experts=4``.

    Raises:
        ValueError: Invalid geometry or config; an input with the wrong channels or a spatial size
            too small for the kernel, the token grid or a reflect/circular padding.

    NaN or Inf in the input make the outputs of the affected tokens NaN and change no other token's
    routing (see :class:`~convmoe.routers.Router`); nothing raises, so AMP loss scaling still works.

    Example:
        >>> block = MoEConv2d(8, 16, kernel_size=3, padding=1, num_experts=4, top_k=2, tokens="grid:3x3")
        >>> y = block(torch.randn(2, 8, 9, 9))
        >>> y.shape, block.last_aux.total.shape
        (torch.Size([2, 16, 9, 9]), torch.Size([]))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", config: MoEConfig | dict[str, Any] | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **overrides: Any) -> None:
        super().__init__()
        config = MoEConfig.coerce(config, where="MoEConv2d(config=...)")
        if overrides:
            config = config.replace(**overrides)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be >= 1.")
        self.config = config
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        # Where the block came from, set by convmoe.patch (adopt) and read by unpatch and describe:
        # the replaced module's name (for errors), the converter that made it, and a weightless copy
        # of the replaced conv, kept outside _modules (no submodule, no state_dict entry, not moved by .to()).
        self.name: str | None = None
        self.converter: str | None = None
        object.__setattr__(self, "dense_template", None)
        geometry = ConvGeometry.create(kernel_size, stride, padding, dilation, padding_mode)
        self.kernel_size, self.stride, self.dilation = geometry.kernel_size, geometry.stride, geometry.dilation
        self.padding = padding

        factory = {"device": device, "dtype": dtype}
        expert_kwargs = {"groups": groups, "bias": bias, "norm": config.expert_norm, "act": config.expert_act,
                         **config.expert_kwargs, **factory}
        self.experts = create_experts(config.experts, in_channels, out_channels, config.num_experts, geometry,
                                      **expert_kwargs)
        self.shared_expert = (create_experts(config.experts, in_channels, out_channels, 1, geometry, **expert_kwargs)
                              if config.shared_expert else None)
        if self.shared_expert is not None and self.experts.capabilities.shared_base:
            raise ValueError(f"shared_expert=True with {type(self.experts).__name__} experts: their shared base conv "
                             "already runs on every position; set shared_expert=False.")
        self.tokens = create_tokens(config.tokens)
        router_kwargs = {"noise_std": config.noise_std, "temperature": config.temperature,
                         "capacity_factor": config.capacity_factor, **config.router_kwargs, **factory}
        if config.gate is not None:
            router_kwargs["gate"] = config.gate
        if config.bias_balancing > 0:  # passed only when on: a user's router need not know the keyword
            router_kwargs["bias_balancing"] = config.bias_balancing
        self.router = create_router(config.router, in_channels, config.num_experts, config.top_k, **router_kwargs)
        self.dropout = create_dropout(config.dropout, drop_rate=config.drop_rate)
        self.dispatcher = create_dispatcher(config.dispatcher)
        self.balancing = BalancingLoss(config.losses)
        self.last_aux: AuxOutput | None = None
        self.last_routing: Routing | None = None
        self._forward_routings: list[Routing] = []

    @property
    def geometry(self) -> ConvGeometry:
        """Geometry the dispatcher works with (the experts' view of the padded input)."""
        return self.experts.geometry

    @property
    def has_bias(self) -> bool:
        """Whether the dense conv the block stands for has a bias (the experts', the shared base's or the
        shared expert's)."""
        experts, shared = self.experts, self.shared_expert
        bias = experts.base_conv()[1] if experts.capabilities.shared_base else getattr(experts, "bias", None)
        return bias is not None or (shared is not None and getattr(shared, "bias", None) is not None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: MoEConfig | dict[str, Any] | None = None, upcycle: bool = True,
                  **overrides: Any) -> MoEConv2d:
        """Build a block with ``conv``'s geometry; with ``upcycle`` every expert starts as a copy of it.

        Upcycled, the combine weights sum to 1 and a shared expert starts at zero, so the block
        computes exactly what ``conv`` computed (up to float rounding) until training changes it.

        Args:
            conv: The convolution to replace (an ``nn.Conv2d``).
            config: MoE settings.
            upcycle: Copy the dense weights into every expert.
            **overrides: Fields of ``config`` to change.

        Example:
            >>> conv = nn.Conv2d(4, 8, 3, padding=1)
            >>> block = MoEConv2d.from_conv(conv, num_experts=4).eval()
            >>> x = torch.randn(2, 4, 7, 7)
            >>> bool((block(x) - conv(x)).abs().max() < 1e-5)
            True
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"MoEConv2d.from_conv needs an nn.Conv2d, got {type(conv).__name__}.")
        block = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, config=config, device=conv.weight.device,
                    dtype=conv.weight.dtype, **overrides)
        if upcycle:
            block.upcycle_from(conv.weight, conv.bias)
        return block

    @torch.no_grad()
    def upcycle_from(self, weight: Tensor, bias: Tensor | None) -> None:
        """Make every expert a copy of a dense conv's weights and zero the shared expert.

        Raises:
            TypeError: The experts cannot be initialised from a dense conv (e.g. residual experts).
        """
        if not hasattr(self.experts, "load_dense"):
            raise TypeError(f"experts {type(self.experts).__name__} cannot be upcycled from a conv; use experts='conv' "
                            "or upcycle=False.")
        self.experts.load_dense(weight, bias, self.config.upcycle_noise_std)
        if self.shared_expert is not None:
            for parameter in self.shared_expert.parameters():
                parameter.zero_()

    def _where(self) -> str:
        return f" (replacing {self.name!r})" if self.name else ""

    def _check_input(self, x: Tensor) -> tuple[int, int]:
        where = self._where()
        if x.dim() != 4:
            raise ValueError(f"MoEConv2d{where} expects a (B, C, H, W) input, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"MoEConv2d{where} got {x.shape[1]} input channels, expected in_channels={self.in_channels}.")
        out_size = self.geometry.output_size(*x.shape[-2:])
        if min(out_size) < 1:
            raise ValueError(f"MoEConv2d{where}: input of spatial size {tuple(x.shape[-2:])} is smaller than the "
                             f"kernel's reach {self.geometry.span} after padding; use a larger input or more padding.")
        self._check_padding(x, where)
        return out_size

    def _check_padding(self, x: Tensor, where: str) -> None:
        # F.pad would fail deep inside the forward pass: reflection needs padding < size, circular <= size.
        mode = self.geometry.padding_mode
        if mode not in ("reflect", "circular"):
            return
        height, width = x.shape[-2:]
        top, bottom, left, right = self.geometry.padding_for(height, width)
        fits = (lambda pad, size: pad < size) if mode == "reflect" else (lambda pad, size: pad <= size)
        if not (fits(max(top, bottom), height) and fits(max(left, right), width)):
            bound = "smaller than" if mode == "reflect" else "at most"
            raise ValueError(f"MoEConv2d{where}: padding_mode={mode!r} needs padding {bound} the input size; got "
                             f"padding (top, bottom, left, right)={(top, bottom, left, right)} for a {height}x{width} "
                             "input; use a larger input or padding_mode='zeros' or 'replicate'.")

    def forward(self, x: Tensor) -> Tensor:
        out_size = self._check_input(x)
        geometry = self.geometry

        # Where to route: tokens are regions of the output; each is summarised by the input at the
        # centre of its positions' receptive fields.
        # The padded copy of x is made only where a step needs it (whole-map convs pad themselves).
        x_pad: Tensor | None = None
        source = geometry.centre_sample_unpadded(x, out_size)  # the same values, without the padded copy's strides
        if source is None:
            x_pad = geometry.pad(x)
            source = geometry.centre_sample(x_pad, out_size)
        try:
            tokens = self.tokens.split(source)
        except ValueError as error:  # a grid larger than the map: name the block that cannot split it
            raise ValueError(f"MoEConv2d{self._where()}: {error}") from error

        # Which experts, with what weight (float32); MEDoE removes experts before the choice.
        expert_mask = None
        if self.dropout is not None and self.training:
            expert_mask = self.dropout(self.config.num_experts, self.router.top_k, x.device)
        routing = self.router(tokens, expert_mask)

        # Dispatch -> experts -> combine, plus the shared expert on every position.
        # While exporting, sparse dispatch (data-dependent shapes) becomes dense: same outputs, static shapes.
        # An empty batch (valid for nn.Conv2d) goes dense too: every expert still gets a (zero) gradient.
        dispatcher = export_dispatcher(self.dispatcher) if is_exporting() else self.dispatcher
        if x.shape[0] == 0 and isinstance(dispatcher, SparseDispatcher):
            dispatcher = _DENSE
        pads_itself = getattr(dispatcher, "pads_itself", False)
        adds_base = getattr(dispatcher, "adds_shared_base", False)
        if x_pad is None and not (pads_itself and adds_base and self.shared_expert is None):
            x_pad = geometry.pad(x)
        if pads_itself:
            y = dispatcher(x, tokens, routing, self.experts, out_size, padded=False)
        else:
            y = dispatcher(x_pad, tokens, routing, self.experts, out_size)
        if not adds_base:  # low-rank experts' W0, for a user's dispatcher
            y = add_shared_base(self.experts, x_pad, y)
        if self.shared_expert is not None:
            y = y + self.shared_expert.forward_segments(x_pad, [x.shape[0]])

        # Losses on the side, where convmoe.aux_loss finds them, and the routing, from which
        # convmoe.routing_stats computes statistics when asked; every call of the model's forward pass
        # counts (a shared head runs once per pyramid level).
        self._record(routing)
        return y

    def _record(self, routing: Routing) -> None:
        if not self.forward_scope_open:
            self.reset_forward_state()  # called on its own: this call replaces the last
        if self.training and torch.is_grad_enabled():
            aux = self.balancing(routing)
            self.last_aux = aux if self.last_aux is None else _added(self.last_aux, aux)
        elif self.last_aux is None:
            # Balancing losses are a training signal: in eval mode or without autograd nobody can
            # train on them, so they are not computed (they cost as much as the router) and the
            # block reports a zero total with no terms.
            self.last_aux = AuxOutput(torch.zeros((), device=routing.probs.device))
        if torch.is_grad_enabled():
            routing = _detached(routing)  # the kept routing never holds the graph
        self._forward_routings.append(routing)
        self.last_routing = routing

    def reset_forward_state(self) -> None:
        """Forget the side outputs (``last_aux``, ``last_routing``, ``forward_routings``) of the last pass.

        Example:
            >>> block = MoEConv2d(4, 4, 1, num_experts=2)
            >>> _ = block(torch.randn(1, 4, 3, 3))
            >>> block.reset_forward_state()
            >>> block.last_aux is None, block.forward_routings
            (True, ())
        """
        self.last_aux = None
        self.last_routing = None
        self._forward_routings = []

    def forward_state(self) -> tuple[AuxOutput | None, Routing | None, list[Routing]]:
        """``last_aux``, ``last_routing`` and the pass's routings, for :meth:`restore_forward_state`."""
        return self.last_aux, self.last_routing, list(self._forward_routings)

    def restore_forward_state(self, state: tuple[AuxOutput | None, Routing | None, list[Routing]]) -> None:
        """Put back what :meth:`forward_state` took (after a probe forward pass)."""
        self.last_aux, self.last_routing, self._forward_routings = state[0], state[1], list(state[2])

    @property
    def forward_routings(self) -> tuple[Routing, ...]:
        """The routing of every call of the block in the current forward pass, oldest first.

        ``(last_routing,)`` when ``last_routing`` was set by hand; empty when the block did not run.

        Example:
            >>> block = MoEConv2d(4, 4, 1, num_experts=2)
            >>> model = nn.Sequential(block, nn.ReLU(), block)  # one block, called twice
            >>> from convmoe.scope import add_forward_scope
            >>> _ = add_forward_scope(model)
            >>> _ = model(torch.randn(1, 4, 3, 3))
            >>> len(block.forward_routings)
            2
        """
        if self.last_routing is None:
            return ()
        recorded = self._forward_routings
        if recorded and recorded[-1] is self.last_routing:
            return tuple(recorded)
        return (self.last_routing,)

    @property
    def forward_calls(self) -> int:
        """How many times the block ran in the current forward pass (0: it did not run)."""
        return len(self.forward_routings)

    def __getstate__(self) -> dict[str, Any]:
        # last_aux holds the autograd graph of the last forward pass: it cannot be deep-copied
        # (copy.deepcopy(model) for an EMA model after a step) and must not travel in a pickle.
        state = super().__getstate__()
        state["last_aux"] = None
        state["forward_scope_open"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles from before forward_routings existed hold only the latest call.
        latest = state.get("last_routing")
        state.setdefault("_forward_routings", [] if latest is None else [latest])
        state.setdefault("converter", None)  # and from before the block declared what patch keeps
        state.setdefault("dense_template", None)
        super().__setstate__(state)

    def adopt(self, name: str, converter: str, dense_template: nn.Module | None) -> MoEConv2d:
        """Record what this block replaced: its module name, the converter, and a weightless copy of
        the conv (``unpatch`` rebuilds it from that copy). Called by :func:`convmoe.patch`.

        Example:
            >>> block = MoEConv2d(4, 4, 3).adopt("layer1.conv", "conv2d", None)
            >>> block.name, block.converter
            ('layer1.conv', 'conv2d')
        """
        self.name, self.converter = name, converter
        object.__setattr__(self, "dense_template", dense_template)
        return self

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"{self.in_channels}, {self.out_channels}", f"kernel_size={self.kernel_size}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        if self.padding not in (0, (0, 0)):
            parts.append(f"padding={self.padding}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        parts += [f"experts={c.num_experts}", f"top_k={c.top_k}", f"tokens={self.tokens}",
                  f"router={c.router if isinstance(c.router, str) else type(self.router).__name__}",
                  f"dispatcher={c.dispatcher if isinstance(c.dispatcher, str) else type(self.dispatcher).__name__}"]
        return ", ".join(parts)


def named_blocks(model: nn.Module) -> dict[str, MoEConv2d]:
    """Every :class:`MoEConv2d` in ``model`` by qualified name, in module order (``model`` itself as ``""``).

    The one lookup of blocks for describe, flops and patch; :func:`convmoe.moe_blocks` also finds
    user blocks that only follow the side-output protocol (``last_aux``, ``last_routing``).

    Example:
        >>> list(named_blocks(nn.Sequential(nn.ReLU(), MoEConv2d(2, 2, 1))))
        ['1']
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, MoEConv2d)}
