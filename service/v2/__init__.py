"""The Open Inference Protocol (KServe v2, as Triton speaks it), independent of the transport.

`protocol`: the model as v2 describes it, request validation and results, on the shared Service. The
transports mount it beside the others: `service.rest.v2` (the `/v2` HTTP routes, JSON and the binary tensor
extension; path templates in `service.rest.v2_routes`) and `service.grpc.inference`
(`inference.GRPCInferenceService`).
"""
