"""The gRPC API's `.proto` and the code grpcio-tools generated from it (committed; see espo.proto).

Generated, not edited: `espo_pb2.py`, `espo_pb2.pyi`, `espo_pb2_grpc.py`. They need
`protobuf>=7.35.1` and `grpcio>=1.85.1` (the `grpc` extra of espo-client).
"""
