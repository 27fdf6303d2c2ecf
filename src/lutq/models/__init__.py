"""Loading models (asset name, HF directory, GGUF file, hub id, lutq checkpoint) and checkpoint I/O."""

from lutq.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointInfo,
    load_checkpoint,
    load_trainer_state,
    read_checkpoint_info,
    save_checkpoint,
    save_trainer_state,
)
from lutq.models.load import SUPPORTED_ARCHITECTURES, architecture_of, load_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_ARCHITECTURES",
    "CheckpointInfo",
    "architecture_of",
    "load_checkpoint",
    "load_model",
    "load_trainer_state",
    "read_checkpoint_info",
    "save_checkpoint",
    "save_trainer_state",
]
