"""TorchServe custom handler for timm's levit_128s (runs in a TorchServe worker, .peers/torchserve venv).

TorchServe's docs: subclass `BaseHandler`, override initialize/preprocess/inference/postprocess; with
`batchSize` > 1 in the model config the frontend hands `handle` a list of requests (one row each) and
expects a list of answers in the same order. The image arrives as the raw request body (`curl -T`,
TorchServe's own examples) under "data" or "body". `peer_model.py` travels in the archive
(`--extra-files`) and is importable from the model directory.
"""

from __future__ import annotations

import os

import peer_model
import torch
from ts.torch_handler.base_handler import BaseHandler


class LeViTHandler(BaseHandler):
    def initialize(self, context) -> None:
        """Load the archived state dict into timm's model; timm's eval transform for the inputs."""
        properties = context.system_properties
        checkpoint = os.path.join(properties["model_dir"], context.manifest["model"]["serializedFile"])
        self.model = peer_model.load_model(checkpoint)
        self.transform = peer_model.eval_transform(self.model)
        self.initialized = True

    def preprocess(self, data: list[dict]) -> torch.Tensor:
        """One tensor per request row, stacked into the batch TorchServe formed."""
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            images.append(peer_model.preprocess(bytes(image), self.transform))
        return torch.stack(images)

    def inference(self, data: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return peer_model.forward(self.model, data)

    def postprocess(self, data: torch.Tensor) -> list[dict]:
        return [peer_model.top5(row) for row in data]
