"""Generated modules for the KServe v2 / Triton GRPCInferenceService subset slimlm serves (see grpc_service.proto
for the command that regenerates them). `pb` holds the messages, `pb_grpc` the servicer base class and the stub."""

from slimlm.serve.grpc_proto import grpc_service_pb2 as pb
from slimlm.serve.grpc_proto import grpc_service_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
