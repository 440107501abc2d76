from transformers import AutoConfig, AutoModel

from .configuration_eagle3 import Eagle3Config, default_aux_layer_ids
from .modeling_eagle3 import Eagle3DraftModel, Eagle3FirstDecoderLayer, Eagle3Output

AutoConfig.register(Eagle3Config.model_type, Eagle3Config, exist_ok=True)
AutoModel.register(Eagle3Config, Eagle3DraftModel, exist_ok=True)

__all__ = ["Eagle3Config", "Eagle3DraftModel", "Eagle3FirstDecoderLayer", "Eagle3Output", "default_aux_layer_ids"]
