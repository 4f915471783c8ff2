"""The OpenAI-compatible chat API served beside the page: request schema, specs, routes, server.

``schema`` reads and checks a request body into a ``ChatRequest`` (a bad one raises ``ApiError``,
answered 400 with OpenAI's error object); ``mapping`` turns its ``steering`` into the runtime's
specs; ``routes`` serves ``POST /v1/chat/completions`` and ``GET /v1/models`` through the
backend's chat engines (the same scheduler as the page); ``server`` mounts the page in a FastAPI
app beside them and runs it.
"""
