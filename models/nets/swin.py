"""Swin UNETR as a ctseg network: MONAI's ``SwinUNETR`` built from a :class:`ModelConfig`, with the patch-merging
layout the config names (models/config.py ``MergingLayout``), so that weights trained with MONAI 0.9-1.4's order
(the released self-supervised encoder) compute under MONAI >= 1.5 what they computed when they were trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2, SwinUNETR
from torch import nn

from models.config import MergingLayout, ModelConfig, SwinEncoderConfig

# (d, h, w) offsets of the eight sub-voxel slices, in concatenation order
MONAI_0_9_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))


class PatchMergingMonai09(PatchMergingV2):
    """MONAI 0.9-1.4's 3D patch merging, order kept as it was (110 and 011 never used, 010 and 001 twice)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in MONAI_0_9_ORDER], -1)
        return self.reduction(self.norm(x))


MERGING_MODULES = {MergingLayout.MONAI_0_9: PatchMergingMonai09, MergingLayout.MONAI_1_5: PatchMerging,
                   MergingLayout.V2: PatchMergingV2}


class InstanceNormTraceable(nn.Module):
    """``nn.InstanceNorm3d`` (no running statistics) written out in plain tensor ops, same parameters and numbers.

    Why: with a dynamic batch axis, the ONNX exporter loses the channel count after Swin's window reshapes and
    refuses ``instance_norm`` ("unknown channel size"); the plain form exports at any batch size.
    """

    def __init__(self, source: nn.InstanceNorm3d) -> None:
        super().__init__()
        if source.track_running_stats:
            raise ValueError("only instance norms without running statistics are replaced")
        self.eps = source.eps
        self.weight = source.weight  # None unless affine; the same Parameter objects, so the same state-dict keys
        self.bias = source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(2, 3, 4), keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)
        return y


def replace_instance_norms(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm3d):
            setattr(module, name, InstanceNormTraceable(child))
            count += 1
        else:
            count += replace_instance_norms(child)
    return count


class SwinSegmenter(nn.Module):
    """Swin UNETR: input ``(B, C, *config.img_size)``, logits ``(B, classes, *config.img_size)``.

    ``encoder`` is MONAI's ``swinViT`` (the part that self-supervised pre-training trains); its state-dict keys
    start with ``net.swinViT.``.
    """

    ENCODER_PREFIX = "net.swinViT."

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        enc = config.encoder
        if not isinstance(enc, SwinEncoderConfig):
            raise TypeError(f"SwinSegmenter needs a Swin encoder config; got {type(enc).__name__}")
        self.config = config
        self.net = SwinUNETR(
            in_channels=config.in_chans, out_channels=config.num_classes, depths=enc.depths, num_heads=enc.num_heads,
            feature_size=enc.feature_size, dropout_path_rate=enc.drop_path_rate, spatial_dims=3,
            downsample=MERGING_MODULES[enc.merging], use_v2=False,
        )
        replace_instance_norms(self.net)

    @property
    def encoder(self) -> nn.Module:
        return self.net.swinViT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
