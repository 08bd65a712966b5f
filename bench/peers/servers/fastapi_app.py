"""A plain FastAPI endpoint for timm's levit_128s (runs in the .peers/fastapi venv).

    uvicorn fastapi_app:app --host 127.0.0.1 --port PORT --workers 1   (LEVIT_PEER_CHECKPOINT set)

What a user writes without a serving framework: a multipart `UploadFile`, one forward pass per
request, no batching. The endpoint is a plain `def`, as FastAPI's docs say for blocking code, so
requests run in its thread pool instead of stalling the event loop.
"""

from __future__ import annotations

import os

import peer_model
from fastapi import FastAPI, UploadFile

model = peer_model.load_model(os.environ["LEVIT_PEER_CHECKPOINT"])
transform = peer_model.eval_transform(model)
app = FastAPI()


@app.post("/classify")
def classify(img: UploadFile) -> dict:
    x = peer_model.preprocess(img.file.read(), transform)
    return peer_model.top5(peer_model.forward(model, x.unsqueeze(0))[0])


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}
