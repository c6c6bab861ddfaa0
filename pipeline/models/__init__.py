"""Models for teachers and students: the CIFAR zoo (zoo), one factory for zoo, torchvision and timm names (factory),
checkpoint files (checkpoints).
"""

from kdcache.models.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from kdcache.models.factory import check_model_name, create_model, list_models

__all__ = ["check_model_name", "create_model", "file_sha256", "list_models", "load_checkpoint", "save_checkpoint"]
