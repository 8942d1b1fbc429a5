"""ALIGN's vision tower: EfficientNet built the way HF transformers' ``AlignVisionModel`` builds it.

Shapes:
    pixel_values: (B, num_channels, H, W)
    stem:         (B, round_filters(32), H // 2, W // 2)   3x3 stride-2 conv after padding right/bottom by one
    blocks:       MBConv (1x1 expand -> kxk depthwise -> squeeze-excite -> 1x1 project [-> + residual])
    last_hidden_state: (B, C_last, h, w)   C_last = round_filters(out_channels[-1]); no top 1x1 conv
    pooler_output:     (B, C_last)         global mean (or max) over h, w

State-dict keys are HF's (``embeddings.convolution``, ``encoder.blocks.N.expansion.expand_conv`` ...), so HF
checkpoints load without conversion.

Two deliberate differences from the reference, both invisible in eval mode:
  * Batch-norm momentum. TF's BatchNormalization(momentum=0.99) keeps 99 % of the running statistic per step;
    PyTorch's ``momentum`` is the weight of the *new* batch statistic. HF passes 0.99 straight to PyTorch, so its
    running statistics are essentially the last batch's. We use ``1 - batch_norm_momentum`` (0.01).
  * Drop connect. EfficientNet drops the whole residual branch per sample (stochastic depth); HF applies
    element-wise ``nn.Dropout`` to it instead. We drop per sample, as the paper and TF code do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.models.align.activations import get_activation
from mmtrain.models.align.configuration import AlignVisionConfig
from mmtrain.models.align.outputs import BaseModelOutputWithPoolingAndNoAttention


def round_filters(config: AlignVisionConfig, num_channels: int) -> int:
    """Scale a channel count by ``width_coefficient`` and round to a multiple of ``depth_divisor`` (never more
    than 10 % down)."""
    divisor = config.depth_divisor
    scaled = num_channels * config.width_coefficient
    new_dim = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new_dim < 0.9 * scaled:
        new_dim += divisor
    return int(new_dim)


def round_repeats(config: AlignVisionConfig, repeats: int) -> int:
    return int(math.ceil(config.depth_coefficient * repeats))


def torch_batch_norm_momentum(config: AlignVisionConfig) -> float:
    """TF momentum (weight of the old running value) -> PyTorch momentum (weight of the new batch value)."""
    return 1.0 - config.batch_norm_momentum


class FloatParamsBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that runs with its scale and shift in the running statistics' dtype (float32).

    FSDP2 with ``param_dtype=bf16`` hands the layer bf16 parameters but leaves the float32 buffers alone, and
    ``F.batch_norm`` refuses bf16 parameters with float32 statistics. Casting the parameters back is what autocast
    gives under DDP: bf16 (or fp32) input, float32 affine and statistics. Same state-dict keys as ``nn.BatchNorm2d``.
    x: (B, C, H, W) -> (B, C, H, W).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.running_mean is None or self.weight.dtype == self.running_mean.dtype:
            return super().forward(x)
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum  # None (cumulative average) is never built here
        dtype = self.running_mean.dtype
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.to(dtype), self.bias.to(dtype),
                            self.training, momentum, self.eps)


def _batch_norm(config: AlignVisionConfig, channels: int) -> nn.BatchNorm2d:
    return FloatParamsBatchNorm2d(channels, eps=config.batch_norm_eps, momentum=torch_batch_norm_momentum(config))


def drop_connect(x: torch.Tensor, rate: float | torch.Tensor, training: bool) -> torch.Tensor:
    """Zero the whole residual branch of a sample with probability ``rate``; scale survivors by 1/(1-rate).

    x: (B, C, H, W) -> (B, C, H, W); ``rate``: a float or a 0-dim tensor.
    """
    if not training or (not isinstance(rate, torch.Tensor) and rate == 0.0):
        return x
    keep = 1.0 - rate
    kept = torch.rand((x.shape[0], 1, 1, 1), device=x.device) < keep
    return x * (kept / keep).to(x.dtype)


class AlignVisionEmbeddings(nn.Module):
    """Stem: pad right/bottom by one (TF "same" for a 3x3 stride-2 conv), conv, BN, activation."""

    def __init__(self, config: AlignVisionConfig) -> None:
        super().__init__()
        self.out_dim = round_filters(config, 32)
        self.convolution = nn.Conv2d(config.num_channels, self.out_dim, kernel_size=3, stride=2, padding=0,
                                     bias=False)
        self.batchnorm = _batch_norm(config, self.out_dim)
        self.activation = get_activation(config.hidden_act)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.pad(pixel_values, (0, 1, 0, 1))
        return self.activation(self.batchnorm(self.convolution(x)))


class AlignVisionExpansionLayer(nn.Module):
    def __init__(self, config: AlignVisionConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.expand_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        # HF leaves this one BN at PyTorch's default momentum (0.1); TF uses 0.99 for every BN, so 0.01 here too.
        self.expand_bn = _batch_norm(config, out_dim)
        self.expand_act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand_act(self.expand_bn(self.expand_conv(x)))


class AlignVisionDepthwiseLayer(nn.Module):
    """kxk depthwise conv. Stride 1: symmetric "same" padding. Stride 2: explicit TF-style padding, one pixel less
    on the top/left when ``adjust_padding`` (the reference's choice for all blocks not in ``depthwise_padding``)."""

    def __init__(self, config: AlignVisionConfig, in_dim: int, stride: int, kernel_size: int,
                 adjust_padding: bool) -> None:
        super().__init__()
        self.stride = stride
        half = kernel_size // 2
        # (left, right, top, bottom) as F.pad takes it
        self.stride2_padding = (half - 1, half, half - 1, half) if adjust_padding else (half, half, half, half)
        self.depthwise_conv = nn.Conv2d(in_dim, in_dim, kernel_size=kernel_size, stride=stride,
                                        padding=0 if stride == 2 else half, groups=in_dim, bias=False)
        self.depthwise_norm = _batch_norm(config, in_dim)
        self.depthwise_act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, self.stride2_padding)
        return self.depthwise_act(self.depthwise_norm(self.depthwise_conv(x)))


class AlignVisionSqueezeExciteLayer(nn.Module):
    """Channel gating: global mean -> 1x1 reduce (to ``in_dim * ratio``) -> act -> 1x1 expand -> sigmoid -> scale."""

    def __init__(self, config: AlignVisionConfig, in_dim: int, expand_dim: int, expand: bool) -> None:
        super().__init__()
        self.dim = expand_dim if expand else in_dim
        self.dim_se = max(1, int(in_dim * config.squeeze_expansion_ratio))
        self.reduce = nn.Conv2d(self.dim, self.dim_se, kernel_size=1)
        self.expand = nn.Conv2d(self.dim_se, self.dim, kernel_size=1)
        self.act_reduce = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.expand(self.act_reduce(self.reduce(gate))))
        return x * gate


class AlignVisionFinalBlockLayer(nn.Module):
    """1x1 projection + BN; the residual is added on every block but the first of a stage (as the reference)."""

    def __init__(self, config: AlignVisionConfig, in_dim: int, out_dim: int, stride: int, drop_rate: float,
                 id_skip: bool) -> None:
        super().__init__()
        self.apply_residual = stride == 1 and not id_skip
        # A buffer, not a float attribute: TorchDynamo specializes on float attributes, so the per-block rates gave
        # each of B7's 55 blocks a compiled graph of its own instead of one per distinct block shape (14).
        self.register_buffer("drop_rate_value", torch.tensor(float(drop_rate), device="cpu"), persistent=False)
        self.project_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        self.project_bn = _batch_norm(config, out_dim)

    @property
    def drop_rate(self) -> float:
        return float(self.drop_rate_value)

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        self.drop_rate_value.fill_(float(value))

    def forward(self, block_input: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.project_bn(self.project_conv(x))
        if self.apply_residual:
            x = drop_connect(x, self.drop_rate_value, self.training) + block_input
        return x


class AlignVisionBlock(nn.Module):
    """One MBConv block. (B, in_dim, H, W) -> (B, out_dim, H / stride, W / stride)."""

    def __init__(self, config: AlignVisionConfig, in_dim: int, out_dim: int, stride: int, expand_ratio: int,
                 kernel_size: int, drop_rate: float, id_skip: bool, adjust_padding: bool) -> None:
        super().__init__()
        self.expand = expand_ratio != 1
        expand_dim = in_dim * expand_ratio
        if self.expand:
            self.expansion = AlignVisionExpansionLayer(config, in_dim, expand_dim)
        inner_dim = expand_dim if self.expand else in_dim
        self.depthwise_conv = AlignVisionDepthwiseLayer(config, inner_dim, stride, kernel_size, adjust_padding)
        self.squeeze_excite = AlignVisionSqueezeExciteLayer(config, in_dim, expand_dim, self.expand)
        self.projection = AlignVisionFinalBlockLayer(config, inner_dim, out_dim, stride, drop_rate, id_skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block_input = x
        if self.expand:
            x = self.expansion(x)
        x = self.squeeze_excite(self.depthwise_conv(x))
        return self.projection(block_input, x)


class AlignVisionEncoder(nn.Module):
    def __init__(self, config: AlignVisionConfig) -> None:
        super().__init__()
        num_blocks = sum(round_repeats(config, n) for n in config.num_block_repeats)
        blocks = []
        block_num = 0
        for stage in range(len(config.in_channels)):
            stage_in = round_filters(config, config.in_channels[stage])
            out_dim = round_filters(config, config.out_channels[stage])
            for j in range(round_repeats(config, config.num_block_repeats[stage])):
                blocks.append(AlignVisionBlock(
                    config,
                    in_dim=stage_in if j == 0 else out_dim,
                    out_dim=out_dim,
                    stride=config.strides[stage] if j == 0 else 1,
                    expand_ratio=config.expand_ratios[stage],
                    kernel_size=config.kernel_sizes[stage],
                    drop_rate=config.drop_connect_rate * block_num / num_blocks,
                    id_skip=j == 0,
                    adjust_padding=block_num not in config.depthwise_padding,
                ))
                block_num += 1
        self.blocks = nn.ModuleList(blocks)


class AlignVisionModel(nn.Module):
    """EfficientNet without a top conv or classifier; pooled output is the ALIGN image embedding (before
    normalization). See the module docstring for shapes."""

    def __init__(self, config: AlignVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = AlignVisionEmbeddings(config)
        self.encoder = AlignVisionEncoder(config)
        self.pooling_type = config.pooling_type
        self.hidden_size = round_filters(config, config.out_channels[-1])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # EfficientNet's variance-scaling init (fan_out, normal) keeps activations at unit scale.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def layer_modules(self) -> list[nn.Module]:
        return list(self.encoder.blocks)

    def forward(self, pixel_values: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (batch, {self.config.num_channels}, height, width), "
                             f"got {tuple(pixel_values.shape)}")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        x = self.embeddings(pixel_values)
        hidden_states = [x] if output_hidden_states else None
        for block in self.encoder.blocks:
            x = block(x)
            if hidden_states is not None:
                hidden_states.append(x)
        pooled = x.amax(dim=(2, 3)) if self.pooling_type == "max" else x.mean(dim=(2, 3))
        out = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=x, pooler_output=pooled,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None)
        return out if return_dict else out.to_tuple()

    @classmethod
    def from_pretrained(cls, directory, config: AlignVisionConfig | None = None, **kwargs) -> AlignVisionModel:
        """Load an HF-layout folder holding an ``AlignModel`` or ``AlignVisionModel`` checkpoint; ``dtype``/
        ``torch_dtype`` as in ``AlignModel.from_pretrained``."""
        from mmtrain.models.align.checkpoint import load_pretrained

        return load_pretrained(cls, directory, config=config, **kwargs)

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        from mmtrain.models.align.checkpoint import save_pretrained

        save_pretrained(self, directory, safe_serialization=safe_serialization)
