"""Networks, built from a NetworkConfig by an explicit name -> constructor dict."""
from __future__ import annotations

from torch import nn

from ..config import NetworkConfig
from .mlp import MLPDenoiser
from .unet import UNet


def build_network(cfg: NetworkConfig, data_shape: tuple[int, ...], learned_variance: bool = False) -> nn.Module:
    """The denoiser network for examples of shape data_shape: (C, H, W) images or (D,) vectors."""
    out_mult = 2 if learned_variance else 1
    if cfg.kind == "unet":
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise ValueError(f"the UNet needs square images (C, H, H); the data has shape {data_shape} (use network.kind='mlp' for vectors)")
        C, H, _ = data_shape
        return UNet(
            in_channels=C, out_channels=C * out_mult, image_size=H, base_channels=cfg.base_channels,
            channel_mult=cfg.channel_mult, num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=cfg.attention_resolutions, num_heads=cfg.num_heads, dropout=cfg.dropout,
            num_classes=cfg.num_classes, context_dim=cfg.context_dim if cfg.text_encoder else 0, patch_size=cfg.patch_size,
        )
    if cfg.kind == "mlp":
        if cfg.text_encoder:
            raise ValueError("text conditioning needs network.kind = 'unet' (cross-attention); the MLP takes class labels only")
        if len(data_shape) != 1:
            raise ValueError(f"the MLP needs vectors (D,); the data has shape {data_shape} (use network.kind='unet')")
        return MLPDenoiser(dim=data_shape[0], hidden=cfg.mlp_hidden, num_layers=cfg.mlp_layers, out_dim=data_shape[0] * out_mult,
                            num_classes=cfg.num_classes)
    raise ValueError(f"unknown network kind {cfg.kind!r}; choose one of ['unet', 'mlp']")


__all__ = ["MLPDenoiser", "UNet", "build_network"]
