"""Convolution geometry: padding, output size, and the input window behind an output region."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}.")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class ConvGeometry:
    """The spatial geometry of a 2-D convolution, with padding made explicit.

    Padding is stored per side, (top, bottom, left, right), so the asymmetric padding of
    ``padding="same"`` with even kernels is exact. ``padding="dynamic_same"`` is TensorFlow's
    'SAME' (timm's ``Conv2dSame``): the padding is computed from each input's size so that the
    output is ``ceil(size / stride)``, the odd pixel going to the bottom/right; ``padding`` then
    holds zeros and :meth:`padding_for` gives the sides for a given input.

    Example:
        >>> g = ConvGeometry.create(kernel_size=3, stride=2, padding=1)
        >>> g.output_size(9, 8)
        (5, 4)
        >>> ConvGeometry.create(kernel_size=3, stride=2, padding="dynamic_same").padding_for(8, 9)
        (0, 1, 1, 1)
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    padding_mode: str = "zeros"
    dynamic_same: bool = False

    @classmethod
    def create(cls, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
               padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
               padding_mode: str = "zeros") -> ConvGeometry:
        """Build from ``nn.Conv2d``-style arguments.

        ``padding`` may be an int, a pair, "same", "valid", or "dynamic_same" (TensorFlow 'SAME',
        computed per input size; zero padding only).
        """
        kernel, step, dil = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
        if min(kernel) < 1 or min(step) < 1 or min(dil) < 1:
            raise ValueError(f"kernel_size, stride and dilation must be >= 1, got {kernel}, {step}, {dil}.")
        if padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode {padding_mode!r} is not supported; use one of {sorted(_PAD_MODES)}.")
        if padding == "dynamic_same":
            if padding_mode != "zeros":
                raise ValueError(f"padding='dynamic_same' pads with zeros, got padding_mode={padding_mode!r}.")
            return cls(kernel, step, dil, (0, 0, 0, 0), padding_mode, dynamic_same=True)
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                if step != (1, 1):
                    raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d); "
                                     "give the padding as numbers.")
                total_h, total_w = dil[0] * (kernel[0] - 1), dil[1] * (kernel[1] - 1)
                pads = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
            else:
                raise ValueError(f"padding {padding!r} is not understood; use an int, a pair, 'same', 'valid' "
                                 "or 'dynamic_same'.")
        else:
            pad_h, pad_w = _pair(padding, "padding")
            if min(pad_h, pad_w) < 0:
                raise ValueError(f"padding must be >= 0, got {padding!r}.")
            pads = (pad_h, pad_h, pad_w, pad_w)
        return cls(kernel, step, dil, pads, padding_mode)

    @property
    def span(self) -> tuple[int, int]:
        """Extent of the dilated kernel, d * (k - 1) + 1, per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation, strict=True))

    @property
    def centre(self) -> tuple[int, int]:
        """Offset of the kernel's centre tap within its span, per axis."""
        return tuple(d * ((k - 1) // 2) for k, d in zip(self.kernel_size, self.dilation, strict=True))

    def padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Padding (top, bottom, left, right) applied to an input of (height, width)."""
        if not self.dynamic_same:
            return self.padding
        pad_h, pad_w = (max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                        for size, k, s, d in zip((height, width), self.kernel_size, self.stride, self.dilation,
                                                 strict=True))
        return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2

    def conv_padding(self, height: int, width: int) -> tuple[int, int] | None:
        """The padding as ``F.conv2d``'s ``padding=(pad_h, pad_w)``, when it is zeros on both sides of each
        axis; None otherwise (reflect, replicate or circular modes, uneven 'same' padding): pad explicitly.

        Example:
            >>> ConvGeometry.create(3, padding=1).conv_padding(8, 8), ConvGeometry.create(2, padding="same").conv_padding(8, 8)
            ((1, 1), None)
        """
        top, bottom, left, right = self.padding_for(height, width)
        if self.padding_mode != "zeros" or top != bottom or left != right:
            return None
        return top, left

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        top, bottom, left, right = self.padding_for(height, width)
        return height + top + bottom, width + left + right

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (H_out, W_out) for an input of (height, width); may be <= 0 for a too-small input."""
        return self.padded_output_size(*self.padded_size(height, width))

    def padded_output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (H_out, W_out) for an already padded input of (height, width)."""
        return tuple((p - s) // st + 1 for p, s, st in zip((height, width), self.span, self.stride, strict=True))

    def pad(self, x: Tensor) -> Tensor:
        """Apply the padding explicitly, so every later step is a padding-free convolution."""
        top, bottom, left, right = self.padding_for(*x.shape[-2:])
        if not any((top, bottom, left, right)):
            return x
        return F.pad(x, (left, right, top, bottom), mode=_PAD_MODES[self.padding_mode])

    def centre_sample(self, x_pad: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Input features at the centre tap of every output position, (B, C, H_out, W_out)."""
        (ch, cw), (sh, sw), (oh, ow) = self.centre, self.stride, out_size
        return x_pad[..., ch : ch + sh * (oh - 1) + 1 : sh, cw : cw + sw * (ow - 1) + 1 : sw]

    def centre_sample_unpadded(self, x: Tensor, out_size: tuple[int, int]) -> Tensor | None:
        """``centre_sample(pad(x))`` read from ``x`` itself when every centre tap falls inside it, else None.

        A view of the unpadded input: the whole ``x`` for a stride-1 'same' conv, where the padded
        map's window is a strided copy away (slower to pool on CPU).

        Example:
            >>> import torch
            >>> g = ConvGeometry.create(3, padding=1)
            >>> x = torch.randn(1, 2, 5, 5)
            >>> g.centre_sample_unpadded(x, (5, 5)) is not None and torch.equal(
            ...     g.centre_sample_unpadded(x, (5, 5)), g.centre_sample(g.pad(x), (5, 5)))
            True
        """
        (ch, cw), (sh, sw), (oh, ow) = self.centre, self.stride, out_size
        top, _, left, _ = self.padding_for(*x.shape[-2:])
        row, col = ch - top, cw - left
        if row < 0 or col < 0 or row + sh * (oh - 1) >= x.shape[-2] or col + sw * (ow - 1) >= x.shape[-1]:
            return None
        if (row, col, sh, sw, oh, ow) == (0, 0, 1, 1, *x.shape[-2:]):
            return x
        return x[..., row : row + sh * (oh - 1) + 1 : sh, col : col + sw * (ow - 1) + 1 : sw]

    def input_extent(self, start: int, stop: int, axis: int) -> tuple[int, int]:
        """Padded-input window [begin, end) that output positions [start, stop) along ``axis`` read."""
        step, span = self.stride[axis], self.span[axis]
        return start * step, (stop - 1) * step + span
