"""The frontend's gRPC server: TF Serving's services (frontend/grpc_api.py), the Open Inference
Protocol's (frontend/oip_grpc.py) and grpc.health.v1, on the frontend's event loop.

Every RPC answers a TFBrokerError with the gRPC code of its class (frontend/grpc_handlers.py).
Health follows
the truth: SERVING once the broker serves its initial models, NOT_SERVING before and while
the frontend stops, for the server (""), TF Serving's services by their full names and by
the short ones TF Serving registers (server.cc: "ModelService", "PredictionService"), and
the Open Inference Protocol's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from frontend.pipeline import Pipeline
from tfbroker.runtime.settings import GrpcOptions, channel_arguments, read_ssl_config

HEALTH_SERVICES = ("", "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService", "ModelService",
                   "PredictionService", "inference.GRPCInferenceService")
HEALTH_REFRESH_S = 1.0  # how soon a Watch of health sees the truth change (a Check asks at once)


async def start_server(pipeline: Pipeline) -> grpc.aio.Server:
    """The gRPC server on this process's event loop. Every frontend binds the same port
    (SO_REUSEPORT, gRPC's default on Linux), so the kernel spreads connections over them."""
    from frontend import grpc_api, oip_grpc  # (their messages load with them)

    options = pipeline.config.grpc
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", pipeline.limits.max_request_body_bytes),
                 ("grpc.max_send_message_length", -1), *channel_arguments(options.grpc_channel_arguments)],
        maximum_concurrent_rpcs=options.grpc_max_threads or None)
    server.add_generic_rpc_handlers([*grpc_api.handlers(pipeline), *oip_grpc.handlers(pipeline)])
    if options.enable_grpc_healthcheck_service:
        health_pb2_grpc.add_HealthServicer_to_server(TruthfulHealth(pipeline), server)
    credentials = server_credentials(options)
    for address in ([f"[::]:{options.port}"] if options.port else []) + (
            [f"unix:{options.grpc_socket_path}"] if options.grpc_socket_path else []):
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    await server.start()
    return server


def server_credentials(options: GrpcOptions) -> grpc.ServerCredentials | None:
    """TF Serving's: ALTS, or TLS from --ssl_config_file (client certificates required with
    client_verify), or none."""
    if options.use_alts_credentials:
        return grpc.alts_server_credentials()
    if not options.ssl_config_file:
        return None
    ssl = read_ssl_config(options.ssl_config_file)
    return grpc.ssl_server_credentials([(ssl.server_key.encode(), ssl.server_cert.encode())],
                                       root_certificates=ssl.custom_ca.encode() or None,
                                       require_client_auth=ssl.client_verify)


class TruthfulHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 with each service's status the pipeline's readiness: asked afresh on
    every Check, and every HEALTH_REFRESH_S while someone Watches."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline
        self._refresher: asyncio.Task[None] | None = None
        self._watchers = 0

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 - gRPC's name
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self.refresh()
        self._watchers += 1
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_while_watched())
        try:
            return await super().Watch(request, context)
        finally:
            self._watchers -= 1

    async def refresh(self) -> None:
        ready, _ = await self.pipeline.ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_SERVICES:
            await self.set(name, status)

    async def _refresh_while_watched(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while self._watchers > 0:
                await asyncio.sleep(HEALTH_REFRESH_S)
                await self.refresh()
