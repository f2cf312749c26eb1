"""The building blocks, each built from rows of the layer list (:class:`mobilenet.spec.Layer`).

- :class:`ConvBNAct`: conv, BatchNorm, activation (V1 paper Figure 3, left: "3x3 Conv, BN, ReLU").
- :class:`DepthwiseSeparable`: V1 paper Figure 3, right: 3x3 depthwise conv, BN, ReLU, 1x1 conv, BN, ReLU.
- :class:`InvertedResidual`: V2 paper Table 1: 1x1 expansion with ReLU6, 3x3 depthwise with ReLU6, 1x1 linear
  projection with no activation, and a shortcut only where stride is 1 and input channels equal output channels.
- a max pool (VGG paper section 2.1: 2x2, stride 2) and :class:`FullyConnected` (VGG's hidden FC layers);
  :func:`build_classifier`: one linear layer, or the two of a factored (low-rank) classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from mobilenet.spec import Block, Layer


def activation_module(name: str | None) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        # Not in place: torch's hardtanh_ computes out of place and copies the result back (one more pass over
        # the tensor, in every training step).
        return nn.ReLU6()
    if name is None:
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}")


class ConvBNAct(nn.Module):
    """A conv with the layer's kernel, stride, groups and 'same' padding, then BatchNorm, then the activation
    (none for V2's linear bottleneck)."""

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            kernel_size=layer.kernel,
            stride=layer.stride,
            padding=layer.padding,
            groups=layer.groups,
            bias=layer.bias,
        )
        self.bn = nn.BatchNorm2d(layer.out_channels) if layer.batchnorm else nn.Identity()
        self.act = activation_module(layer.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """V1's depthwise separable block (V1 paper section 3.1, Figure 3): a depthwise 3x3 conv that filters each
    input channel on its own, then a pointwise 1x1 conv that combines them, each with BN and ReLU."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        depthwise, pointwise = block.layers
        self.depthwise = ConvBNAct(depthwise)
        self.pointwise = ConvBNAct(pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class InvertedResidual(nn.Module):
    """V2's bottleneck residual block (V2 paper Table 1, Figure 4): expand with a 1x1 conv by t (absent when t = 1),
    filter with a 3x3 depthwise conv, project linearly with a 1x1 conv; add the input where shapes allow."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        layers = list(block.layers)
        self.expand = ConvBNAct(layers.pop(0)) if len(layers) == 3 else None
        self.depthwise = ConvBNAct(layers[0])
        self.project = ConvBNAct(layers[1])
        self.use_residual = block.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class FullyConnected(nn.Module):
    """A hidden fully connected layer: dropout on its input (none for the first one after the pool), linear,
    activation. VGG (paper section 3.1) drops out the outputs of its first two FC layers, which are the inputs of
    the second and third."""

    def __init__(self, layer: Layer, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(layer.in_channels, layer.out_channels, bias=layer.bias)
        self.act = activation_module(layer.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(self.dropout(x)))


def build_classifier(layers: tuple[Layer, ...]) -> nn.Module:
    """One ``nn.Linear``, or for a factored classifier (``classifier_rank``) the two linear layers features -> r
    -> classes in an ``nn.Sequential`` (keys ``classifier.0.weight``, ``classifier.1.weight``/``.bias``); none for
    a headless model (an identity: the pooled features come out)."""
    linears = [nn.Linear(layer.in_channels, layer.out_channels, bias=layer.bias) for layer in layers]
    if not linears:
        return nn.Identity()
    if len(linears) == 1:
        return linears[0]
    return nn.Sequential(*linears)


def build_block(block: Block) -> nn.Module:
    if block.kind == "conv":
        (layer,) = block.layers
        return ConvBNAct(layer)
    if block.kind == "separable":
        return DepthwiseSeparable(block)
    if block.kind == "inverted_residual":
        return InvertedResidual(block)
    if block.kind == "maxpool":
        (layer,) = block.layers
        return nn.MaxPool2d(kernel_size=layer.kernel, stride=layer.stride, padding=layer.padding)
    raise ValueError(f"unknown block kind {block.kind!r}")
