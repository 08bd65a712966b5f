"""LitServe server for timm's levit_128s (runs in the .peers/litserve venv).

    python litserve_app.py PORT CHECKPOINT

LitServe's docs: a `LitAPI` with setup/decode_request/batch/predict/unbatch/encode_response, batching
switched on with `max_batch_size` and `batch_timeout` on the API, served by `LitServer(...).run(port=...)`.
The image is a multipart upload (field "img"); LitServe hands `decode_request` the parsed form, in the
inference worker process, so decoding runs there, once per request, before batching.
"""

from __future__ import annotations

import sys

import litserve as ls
import peer_model
import torch

MAX_BATCH_SIZE = 16
BATCH_TIMEOUT_S = 0.01


class LeViTAPI(ls.LitAPI):
    def __init__(self, checkpoint: str) -> None:
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
        self.checkpoint = checkpoint

    def setup(self, device: str) -> None:
        self.model = peer_model.load_model(self.checkpoint)
        self.transform = peer_model.eval_transform(self.model)

    def decode_request(self, request) -> torch.Tensor:  # request: starlette FormData
        return peer_model.preprocess(request["img"].file.read(), self.transform)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return peer_model.forward(self.model, x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict:
        return peer_model.top5(output)


if __name__ == "__main__":
    port, checkpoint = int(sys.argv[1]), sys.argv[2]
    server = ls.LitServer(LeViTAPI(checkpoint), accelerator="cpu")
    server.run(host="127.0.0.1", port=port, generate_client_file=False)
