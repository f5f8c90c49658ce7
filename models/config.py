"""Typed, torch-free description of a segmentation network, stored in checkpoints and bundle manifests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any, Literal

from models.axes import Triple, as_triple

BlockType = Literal["vit", "beit"]
TokenMode = Literal["3d", "2.5d"]
SWIN_DOWNSAMPLING = 32  # patch 2, then four patch-merging stages: 2 * 2**4


class MergingLayout(str, Enum):
    """The order in which Swin's 3D patch merging concatenates the eight sub-voxel slices.

    Names and shapes of the layer are the same in every layout, so no look at a file can tell them apart: a
    checkpoint's layout is a fact of where it comes from (the released self-supervised Swin UNETR weights were
    trained with MONAI 0.9-1.4's order) and ctseg records it in every Swin config it writes.
    """

    MONAI_0_9 = "monai-0.9"  # MONAI 0.9-1.4: 000, 100, 010, 001, 101, 010, 001, 111 (two slices twice)
    MONAI_1_5 = "monai-1.5"  # MONAI >= 1.5 "merging": 000, 100, 010, 001, 110, 101, 011, 111
    V2 = "v2"  # MONAI "mergingv2": itertools order 000, 001, 010, 011, 100, 101, 110, 111


class ModelConfigError(ValueError):
    """A model configuration breaks one of the architecture's rules."""


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of the transformer encoder; names and defaults follow timm's ViT."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    block: BlockType = "vit"
    init_values: float | None = None
    abs_pos_embed: bool = True
    rel_pos_bias: bool = False
    final_norm: bool = True
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ModelConfigError(
                f"embed_dim must be divisible by num_heads; got embed_dim={self.embed_dim}, num_heads={self.num_heads}"
            )
        if self.depth < 1:
            raise ModelConfigError(f"encoder depth must be >= 1; got {self.depth}")
        if self.block not in ("vit", "beit"):
            raise ModelConfigError(f"block must be 'vit' or 'beit'; got {self.block!r}")
        if self.rel_pos_bias and self.block != "beit":
            raise ModelConfigError("relative position bias is only available with block='beit'")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def skip_blocks(self) -> tuple[int, int, int, int]:
        """1-based block indices whose outputs feed the decoder: four evenly spaced depths (3, 6, 9, 12 for 12)."""
        d = self.depth
        picks = [max(1, round(d * k / 4)) for k in (1, 2, 3, 4)]
        return (picks[0], picks[1], picks[2], picks[3])


@dataclass(frozen=True)
class SwinEncoderConfig:
    """Swin UNETR's encoder (Hatamizadeh et al. 2022; Tang et al. 2022): names and defaults follow MONAI's
    ``SwinUNETR`` and the released self-supervised checkpoint (feature size 48, depths 2-2-2-2, heads 3-6-12-24,
    window 7, patch 2, qkv bias, no patch norm)."""

    feature_size: int = 48
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    window_size: int = 7
    merging: MergingLayout = MergingLayout.MONAI_1_5
    drop_path_rate: float = 0.0
    kind: Literal["swin"] = "swin"

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        try:
            object.__setattr__(self, "merging", MergingLayout(self.merging))
        except ValueError:
            raise ModelConfigError(f"merging must be one of {[m.value for m in MergingLayout]}; "
                                   f"got {self.merging!r}") from None
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ModelConfigError(f"Swin UNETR has four stages: depths and num_heads need four values each; got "
                                   f"depths={self.depths}, num_heads={self.num_heads}")
        if self.feature_size % 12:
            raise ModelConfigError(f"Swin UNETR's feature_size must be divisible by 12 (its heads split it); "
                                   f"got {self.feature_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depths"], d["num_heads"], d["merging"] = list(self.depths), list(self.num_heads), self.merging.value
        return d


@dataclass(frozen=True)
class ModelConfig:
    """A whole network: encoder, token grid and UNETR-style decoder.

    ``img_size`` is the ROI the network takes, ``patch_size`` the 3D patch; both in (D, H, W) order.
    Full 3D mode has a depth patch smaller than the ROI depth; 2.5D mode (TransSeg) has one depth token
    and predicts the centre slice only.
    """

    name: str
    img_size: Triple
    patch_size: Triple
    encoder: EncoderConfig | SwinEncoderConfig
    in_chans: int = 1
    num_classes: int = 2
    feature_size: int = 16
    backbone: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", as_triple(self.img_size, "img_size"))
        object.__setattr__(self, "patch_size", as_triple(self.patch_size, "patch_size"))
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", encoder_from_dict(self.encoder))
        if self.num_classes < 2:
            raise ModelConfigError(f"num_classes counts background and must be >= 2; got {self.num_classes}")
        if self.in_chans < 1:
            raise ModelConfigError(f"in_chans must be >= 1; got {self.in_chans}")
        if self.is_swin:
            for axis, size in zip("DHW", self.img_size):
                if size % SWIN_DOWNSAMPLING:
                    raise ModelConfigError(
                        f"Swin UNETR halves its input five times: the ROI must be divisible by {SWIN_DOWNSAMPLING} on "
                        f"every axis; axis {axis}: got {size} (img_size={self.img_size})")
            if self.patch_size != (2, 2, 2):
                raise ModelConfigError(f"Swin UNETR's patch size is 2 on every axis; got {self.patch_size}")
            return
        for axis, size, patch in zip("DHW", self.img_size, self.patch_size):
            if size % patch:
                raise ModelConfigError(
                    f"ROI must be a multiple of the patch size on every axis; axis {axis}: ROI {size} is not a "
                    f"multiple of patch {patch} (img_size={self.img_size}, patch_size={self.patch_size})"
                )
        ph, pw = self.patch_size[1:]
        for axis, p in (("H", ph), ("W", pw)):
            if p < 2 or p & (p - 1):
                raise ModelConfigError(f"in-plane patch size must be a power of two >= 2; axis {axis}: got {p}")
        if ph != pw:
            raise ModelConfigError(f"in-plane patch must be square; got H={ph}, W={pw}")
        pd = self.patch_size[0]
        if self.mode == "3d" and (pd & (pd - 1) or pd > ph):
            raise ModelConfigError(
                f"in full 3D mode the depth patch must be a power of two no larger than the in-plane patch; got {pd}"
            )
        if self.encoder.block == "beit" and self.mode != "2.5d":
            raise ModelConfigError(
                "BEiT's relative position bias is two-dimensional: use 2.5D mode (depth patch = ROI depth); "
                f"got img_size={self.img_size}, patch_size={self.patch_size}"
            )

    @property
    def is_swin(self) -> bool:
        return isinstance(self.encoder, SwinEncoderConfig)

    @property
    def mode(self) -> TokenMode:
        return "2.5d" if self.patch_size[0] == self.img_size[0] else "3d"

    @property
    def grid_size(self) -> Triple:
        d, h, w = (s // p for s, p in zip(self.img_size, self.patch_size))
        return (d, h, w)

    @property
    def out_size(self) -> Triple:
        """Spatial size of the logits: the ROI in 3D mode, the centre slice in 2.5D mode."""
        d, h, w = self.img_size
        return (1, h, w) if self.mode == "2.5d" else (d, h, w)

    @property
    def num_up_stages(self) -> int:
        return int(math.log2(self.patch_size[1]))

    def upsample_factors(self) -> list[Triple]:
        """Per decoder stage (coarse to fine), the (D, H, W) upsampling factor."""
        stages = self.num_up_stages
        depth_ups = 0 if self.mode == "2.5d" else int(math.log2(self.patch_size[0]))
        return [(2 if i >= stages - depth_ups else 1, 2, 2) for i in range(stages)]

    def with_updates(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["img_size"] = list(self.img_size)
        data["patch_size"] = list(self.patch_size)
        if self.is_swin:
            data["encoder"] = self.encoder.to_dict()  # type: ignore[union-attr]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelConfigError(f"unknown model config fields: {sorted(unknown)}")
        enc = data.get("encoder")
        if not isinstance(enc, (dict, EncoderConfig, SwinEncoderConfig)):
            raise ModelConfigError("model config needs an 'encoder' mapping")
        return cls(**{**data, "encoder": encoder_from_dict(enc) if isinstance(enc, dict) else enc})


def encoder_from_dict(enc: dict[str, Any]) -> EncoderConfig | SwinEncoderConfig:
    kind = SwinEncoderConfig if enc.get("kind") == "swin" else EncoderConfig
    known = {f.name for f in fields(kind)}
    if set(enc) - known:
        raise ModelConfigError(f"unknown encoder config fields: {sorted(set(enc) - known)}")
    return kind(**enc)
