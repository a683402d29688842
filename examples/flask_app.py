"""Your own Flask app calling the shared model: pre- and post-processing in Python, the model
once per accelerator in the broker, no TensorFlow in the web workers.

    pip install -e '.[examples]'        # Flask, FastAPI, gunicorn
    python -m broker &                  # the demo: its mlp is the default MODEL_NAME
    gunicorn -w 4 -b 127.0.0.1:8000 examples.flask_app:app
    curl -d '{"features": {"f0": 1.5, "f3": -2}}' http://127.0.0.1:8000/score

TFBROKER_ADDRESS names another broker (default: the one on this host's port 8501), MODEL_NAME
another model that takes x float32 [batch, width]. The Client is created at import (before
gunicorn forks) and opens its socket in each worker on first use. Its errors carry the HTTP
status to answer with.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from tfbroker.wire.errors import TFBrokerError
from examples.processing import input_width, postprocess, preprocess
from tfbroker import Client

MODEL = os.environ.get("MODEL_NAME", "mlp")

app = Flask(__name__)
client = Client(os.environ.get("TFBROKER_ADDRESS"), timeout_s=10.0)
width: list[int] = []  # the model's input width, asked once per worker


def model_width() -> int:
    if not width:
        width.append(input_width(client.metadata(MODEL)))
    return width[0]


@app.post("/score")
def score():  # noqa: ANN201 - Flask's response types
    try:
        inputs = preprocess(request.get_json(force=True, silent=True), model_width())
        result = client.predict(MODEL, inputs)
    except ValueError as exc:
        return jsonify(error=str(exc)), 400
    except TFBrokerError as exc:
        return jsonify(error=exc.message), exc.http_status
    return jsonify(postprocess(result.outputs, result.version))
