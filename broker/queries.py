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


def request_logging(models: Mapping[str, ServedModel], header: protocol.Query,
                    saved_model_tags: str) -> protocol.ControlReply:
    """What the frontends need to write each model's request log (frontend/request_log.py): its
    logging_config, and the name of each signature's only input per version (a request may
    name it "", as TF Serving's ``"instances": [...]``; the log names it as TF Serving does)."""
    logged = {}
    for name, model in models.items():
        logging = model.config.logging
        if logging is None or model.removed or logging.sampling_rate <= 0:
            continue
        only_inputs = {str(served.version): {signature: next(iter(spec.inputs))
                                             for signature, spec in served.signatures.items() if len(spec.inputs) == 1}
                       for served in model.versions.values()}
        logged[name] = {"sampling_rate": logging.sampling_rate, "filename_prefix": logging.filename_prefix,
                        "only_inputs": only_inputs}
    return protocol.ControlReply(id=header.id, body={"models": logged,
                                                     "saved_model_tags": saved_model_tags.split(",")})


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
