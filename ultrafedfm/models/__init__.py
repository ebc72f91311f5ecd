"""The masked autoencoder (MAE) around timm's VisionTransformer, its presets and encoder export."""
from ultrafedfm.models.export import export_encoder, save_encoder, timm_model_kwargs, timm_model_name
from ultrafedfm.models.mae import MaskedAutoencoder, build_mae

__all__ = ["MaskedAutoencoder", "build_mae", "export_encoder", "save_encoder", "timm_model_kwargs", "timm_model_name"]
