"""Fine-tuning Dimba: the reference objective, a latent/caption cache, LoRA or full training, DDP (`python -m dimba_core train`)."""
from .objective import training_losses
from .loop import train
from .options import TrainOptions

__all__ = ["TrainOptions", "train", "training_losses"]
