"""A plain grpcio ResultMapper server for the serving benchmark (`bench.bench_serving`).

``python -m bench.mapper_server --weights MAPPER.safetensors --credential-hash H
[--users N] [--mode aio|sync] [--port 0]`` loads the mapper for users ``bench-0 ..
bench-{N-1}`` into a `MapperRegistry`, serves ``modelguard.v1.ResultMapper`` (Map,
MapStream, GetStatus) and prints ``READY <port>`` once it accepts calls.

It is the registry behind the thinnest servicer possible (no metrics or error
interceptors; errors are mapped inline with the same codes): the figure it produces is
the ceiling the production servicer approaches, and the production server's extra cost
is its interceptors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from services.result_mapper.core.registry import MapperRegistry
from shared.errors import ModelGuardError
from shared.proto.modelguard.v1 import common_pb2, result_mapper_pb2, result_mapper_pb2_grpc

log = logging.getLogger(__name__)


def _response(registry: MapperRegistry, request: Any) -> Any:
    result = registry.map(request.user_id, request.credential, request.pseudo_output, request.rows)
    return result_mapper_pb2.MapResponse(
        labels=result.labels.tolist(),
        probabilities=result.probabilities_bytes(),
        classes=result.classes,
        generation=result.generation,
    )


class SyncServicer(result_mapper_pb2_grpc.ResultMapperServicer):
    def __init__(self, registry: MapperRegistry) -> None:
        self.registry = registry

    def Map(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return _response(self.registry, request)
        except ModelGuardError as err:
            context.abort(err.code, str(err))

    def MapStream(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        for request in request_iterator:
            try:
                yield _response(self.registry, request)
            except ModelGuardError as err:
                context.abort(err.code, str(err))

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return common_pb2.ServiceStatus(service="result-mapper-bench")


class AioServicer(result_mapper_pb2_grpc.ResultMapperServicer):
    def __init__(self, registry: MapperRegistry) -> None:
        self.registry = registry

    async def Map(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        try:
            return _response(self.registry, request)
        except ModelGuardError as err:
            await context.abort(err.code, str(err))

    async def MapStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in request_iterator:
            try:
                yield _response(self.registry, request)
            except ModelGuardError as err:
                await context.abort(err.code, str(err))

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        return common_pb2.ServiceStatus(service="result-mapper-bench")


def build_registry(weights: bytes, credential_hash: str, users: int) -> MapperRegistry:
    registry = MapperRegistry()
    for i in range(users):
        registry.hot_load(f"bench-{i}", 0, weights, credential_hash)
    return registry


async def serve_aio(registry: MapperRegistry, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    result_mapper_pb2_grpc.add_ResultMapperServicer_to_server(AioServicer(registry), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"READY {bound}", flush=True)
    await server.wait_for_termination()


def serve_sync(registry: MapperRegistry, port: int, workers: int) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=[("grpc.so_reuseport", 0)]
    )
    result_mapper_pb2_grpc.add_ResultMapperServicer_to_server(SyncServicer(registry), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"READY {bound}", flush=True)
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--credential-hash", required=True)
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--mode", choices=("aio", "sync"), default="aio")
    parser.add_argument("--workers", type=int, default=8, help="sync mode thread pool")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    registry = build_registry(args.weights.read_bytes(), args.credential_hash, args.users)
    if args.mode == "aio":
        asyncio.run(serve_aio(registry, args.port))
    else:
        serve_sync(registry, args.port, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
