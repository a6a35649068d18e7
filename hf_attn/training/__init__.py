"""Training stack for hf_attn: configs, data, tokenizer, Accelerate training loop, checkpoints.

Not imported by the modeling files (the Hub copy of the model stays small); import it explicitly::

    from hf_attn.training import load_config, train
    result = train(load_config("configs/small_eager.yaml", ["--training.max_steps", "10"]))
"""

from hf_attn.training.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from hf_attn.training.config import ExperimentConfig, config_from_dict, load_config, resume_command
from hf_attn.training.signals import TrainingInterrupted
from hf_attn.training.tokenizer import load_tokenizer, train_bpe_tokenizer
from hf_attn.training.trainer import NonFiniteLossError, TrainResult, train

__all__ = [
    "CheckpointError",
    "ExperimentConfig",
    "NonFiniteLossError",
    "TrainResult",
    "TrainingInterrupted",
    "config_from_dict",
    "latest_checkpoint",
    "load_config",
    "load_tokenizer",
    "resume_command",
    "save_checkpoint",
    "train",
    "train_bpe_tokenizer",
]
