"""`llmctl serve`: an OpenAI-compatible HTTP API over the workspace's models, and a web page
(static/) to chat with them, compare checkpoints and watch runs. Needs the `serve` extra
(FastAPI, uvicorn); docs/serve.md describes the endpoints, limits and the page."""
