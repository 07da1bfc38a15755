"""RepViT model zoo: definition, reparameterization, profiling."""
from .repvit import RepViT, create_model, block_specs
from .reparam import ReparamError, reparameterize, is_fused
from .profile import profile, ModelProfile
from .init import randomize_bn

__all__ = ["RepViT", "create_model", "block_specs", "ReparamError", "reparameterize",
           "is_fused", "profile", "ModelProfile", "randomize_bn"]
