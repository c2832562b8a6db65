"""XLT encoders (BERT / XLM-R compatible), task heads, size presets, Hugging Face load / export (`hf`)."""
from . import hf
from .config import PRESETS, EncoderConfig, preset
from .encoder import Encoder, lengths_from_mask
from .heads import IGNORE, MaskedLMHead, TaskModel, make_head

__all__ = ["IGNORE", "PRESETS", "EncoderConfig", "Encoder", "MaskedLMHead", "TaskModel", "hf", "lengths_from_mask",
           "make_head", "preset"]
