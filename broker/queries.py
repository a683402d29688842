"""What the broker answers from its models alone: which version a request is pinned to, and
TF Serving's METADATA and STATUS replies."""

from __future__ import annotations

from typing import Mapping

from tfbroker.wire import protocol
from tfbroker.wire.errors import NotFound, Unavailable
from broker.models import ServedModel, ServedVersion


def resolve(models: Mapping[str, ServedModel], name: str | None, version: int | None,
            label: str | None) -> ServedVersion:
    """The version a request is pinned to, chosen once at admission."""
    model = models.get(name) if name is not None else None
    if model is None:
        raise NotFound(f"Servable not found for request: Latest({name})")
    return model.resolve(version, label)


def metadata(models: Mapping[str, ServedModel], header: protocol.Query) -> protocol.MetadataReply:
    served = resolve(models, header.model, header.version, header.label)
    return protocol.MetadataReply(id=header.id, model=served.model, version=served.version,
                                  signature_def=served.signature_def)


def status(models: Mapping[str, ServedModel], header: protocol.Query) -> protocol.StatusReply:
    model = models.get(header.model) if header.model is not None else None
    if model is None or not model.versions:
        raise NotFound(f"Could not find any versions of model {header.model}")
    versions = list(model.versions.values())
    wanted = model.version_of_label(header.label) if header.label else header.version
    if wanted is not None:
        versions = [v for v in versions if v.version == wanted]
        if not versions:
            raise NotFound(f"Could not find version {wanted} of model {header.model}")
    versions.sort(key=lambda v: v.version, reverse=True)
    return protocol.StatusReply(id=header.id, model=model.name,
                                model_version_status=[v.status_json() for v in versions])


def health(models: Mapping[str, ServedModel], header: protocol.Query, stopping: bool) -> protocol.HealthReply:
    """Ready: not stopping, and every model (or the one asked for, at its version or label)
    has a version that takes requests. An unknown model is NotFound, not unready."""
    if stopping:
        return protocol.HealthReply(id=header.id, ready=False, reason="the server is stopping")
    if header.model is not None:
        if header.model not in models:
            raise NotFound(f"Servable not found for request: Latest({header.model})")
        asked = [models[header.model]]
    else:
        asked = [model for model in models.values() if not model.unloaded]  # (unloaded on purpose)
    for model in asked:
        try:
            model.resolve(header.version, header.label)
        except (NotFound, Unavailable) as exc:
            if header.model is not None and isinstance(exc, NotFound) and (header.version is not None or header.label):
                raise
            return protocol.HealthReply(id=header.id, ready=False, reason=exc.message)
    return protocol.HealthReply(id=header.id, ready=True)
