"""`blipkit serve`: BLIP over HTTP with request batching, and a web page to try every task.

    import blipkit
    from blipkit.serve import create_app
    app = create_app(blipkit.load("scenes-blip"), max_batch=16, max_wait_ms=5)   # a FastAPI app
    # uvicorn.run(app, host="127.0.0.1", port=8000), or: blipkit serve --port 8000

Needs the `serve` extra: `pip install 'blipkit[serve]'` (FastAPI, uvicorn, python-multipart). See docs/serve.md.
"""

from .app import capabilities, create_app
from .batching import Batcher
from .inputs import Limits

__all__ = ["Batcher", "Limits", "capabilities", "create_app"]
