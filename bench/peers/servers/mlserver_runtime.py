"""MLServer custom runtime for timm's levit_128s (runs in the .peers/mlserver venv).

MLServer's docs for a custom model: subclass `MLModel`, implement `load` and `predict`, name the class
in model-settings.json (`implementation`), turn on adaptive batching there (`max_batch_size`,
`max_batch_time`). Requests use the Open Inference (v2) protocol: one BYTES input "img" of shape [1]
holding the base64-encoded image (`parameters.content_type: base64`); adaptive batching concatenates
requests along that first axis, and splits the [N, 5] outputs back per request.
"""

from __future__ import annotations

import numpy as np
import peer_model
import torch
from mlserver import MLModel
from mlserver.codecs import Base64Codec, NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class LeViTRuntime(MLModel):
    async def load(self) -> bool:
        """The checkpoint path comes from model-settings.json's `parameters.uri`."""
        self.model = peer_model.load_model(self.settings.parameters.uri)
        self.transform = peer_model.eval_transform(self.model)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = self.decode(payload.inputs[0], default_codec=Base64Codec)
        batch = torch.stack([peer_model.preprocess(image, self.transform) for image in images])
        scores, indices = peer_model.forward(self.model, batch).topk(peer_model.TOP_K)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output("indices", indices.numpy().astype(np.int64)),
                NumpyCodec.encode_output("scores", scores.numpy()),
            ],
        )
