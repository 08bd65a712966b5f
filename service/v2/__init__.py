"""The Open Inference Protocol (KServe v2, as Triton speaks it) over HTTP and gRPC, on the shared Service.

`protocol`: the model as v2 describes it, request validation and results, shared by both transports;
`rest`: the `/v2` HTTP routes (JSON and the binary tensor extension); `servicer`: `inference.GRPCInferenceService`;
`routes`: the HTTP path templates (metric labels).
"""
