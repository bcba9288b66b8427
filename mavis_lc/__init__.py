"""mavis-lc: steer a frozen language model toward several objectives at once, with weights per call.

The public API is what ``__all__`` lists; everything else is private and may change.
"""

from mavis_lc.base_model import BaseModel, load_base_model, tokenizer_fingerprint
from mavis_lc.decoding import DecodeConfig, Generation, MavisDecoder, mavis_step
from mavis_lc.errors import (
    ArtifactError,
    ConfigurationError,
    DecodingParameterError,
    EngineBusyError,
    IncompatibleHeadError,
    InvalidWeightError,
    JobError,
    MavisError,
    MissingExtraError,
    ModelLoadError,
    NotFoundError,
    RegistryError,
    RewardError,
    SpecError,
    TrainingCancelled,
    TrainingError,
    UnknownObjectiveError,
)
from mavis_lc.langchain import ChatMavis, MavisLLM
from mavis_lc.settings import Settings, get_settings
from mavis_lc.value_models import SharedBackboneQHead, ValueHeadConfig, ValueModel, load_value_model, new_shared_head
from mavis_lc.weights import parse_weights, validate_weights

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BaseModel",
    "ChatMavis",
    "ConfigurationError",
    "DecodeConfig",
    "DecodingParameterError",
    "EngineBusyError",
    "Generation",
    "IncompatibleHeadError",
    "InvalidWeightError",
    "JobError",
    "MavisDecoder",
    "MavisError",
    "MavisLLM",
    "MissingExtraError",
    "ModelLoadError",
    "NotFoundError",
    "RegistryError",
    "RewardError",
    "Settings",
    "SharedBackboneQHead",
    "SpecError",
    "TrainingCancelled",
    "TrainingError",
    "UnknownObjectiveError",
    "ValueHeadConfig",
    "ValueModel",
    "get_settings",
    "load_base_model",
    "load_value_model",
    "mavis_step",
    "new_shared_head",
    "parse_weights",
    "tokenizer_fingerprint",
    "validate_weights",
]
