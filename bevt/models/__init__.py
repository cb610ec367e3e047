"""Models: the Video Swin backbone (3D clips + 2D images), the BEVT pretraining model, checkpoint adaptation."""
from bevt.models.bevt import BEVT, BEVTOutput, create_bevt
from bevt.models.registry import create_model, list_models, model_config
from bevt.models.video_swin import VideoSwinTransformer, compile_blocks

__all__ = ["BEVT", "BEVTOutput", "create_bevt", "create_model", "list_models", "model_config", "VideoSwinTransformer",
           "compile_blocks"]
