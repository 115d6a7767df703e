"""Seldon MLServer runtime serving a ModelGuard mapping network (serving benchmark only).

Runs inside the separate MLServer venv (``.cache/mlserver-venv``: MLServer pins
protobuf < 7). `bench.bench_serving` serves one model per user in MLServer's multi-model
mode: it copies this file to the model repository's root (on the server's PYTHONPATH) and
writes one directory per user, whose ``model-settings.json`` names this runtime and whose
``.npz`` holds that user's weights, the same arrays the result-mapper serves (``w1``
(in, hidden), ``b1``, ``w2`` (hidden, classes), ``b2``; ``.npz`` because safetensors is
not installed there). The maths is the registry's: numpy matmuls and a softmax.
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel  # type: ignore[import-not-found]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found]


class NumpyMapper(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        with np.load(self.settings.parameters.uri) as data:
            self.w1 = np.ascontiguousarray(data["w1"], dtype=np.float32)
            self.b1 = np.ascontiguousarray(data["b1"], dtype=np.float32)
            self.w2 = np.ascontiguousarray(data["w2"], dtype=np.float32)
            self.b2 = np.ascontiguousarray(data["b2"], dtype=np.float32)
        self.in_features = self.w1.shape[0]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        x = x.reshape(-1, self.in_features)
        h = np.maximum(x @ self.w1 + self.b1, 0.0)
        logits = h @ self.w2 + self.b2
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        labels = probabilities.argmax(axis=1).astype(np.int32)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output("labels", labels),
                NumpyCodec.encode_output("probabilities", probabilities.astype(np.float32)),
            ],
        )
