"""RepViT model zoo: definition, reparameterization, profiling."""
from pipeline.models.init import randomize_bn
from pipeline.models.profile import ModelProfile, profile
from pipeline.models.reparam import ReparamError, is_fused, reparameterize
from pipeline.models.repvit import RepViT, block_specs, create_model

__all__ = ["RepViT", "create_model", "block_specs", "ReparamError", "reparameterize",
           "is_fused", "profile", "ModelProfile", "randomize_bn"]
