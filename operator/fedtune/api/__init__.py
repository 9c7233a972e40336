"""The FederatedFineTune API: spec models, loading with field-named errors."""

from fedtune.api.loading import SpecError, load_resource, parse_resource
from fedtune.api.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    FederatedFineTune,
    FederatedFineTuneSpec,
)

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "KIND",
    "PLURAL",
    "FederatedFineTune",
    "FederatedFineTuneSpec",
    "SpecError",
    "load_resource",
    "parse_resource",
]
