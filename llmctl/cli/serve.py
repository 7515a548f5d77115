"""`llmctl serve`: an OpenAI-compatible HTTP API and a web page for every model in the workspace."""

from __future__ import annotations

import typer

from llmctl.cli.common import DEVICE, DTYPE, MODEL_REF_HELP, note, success, warn, workspace

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(
    model: list[str] = typer.Option(
        [],
        "--model",
        "-m",
        show_default=False,
        help=f"Serve only this model ({MODEL_REF_HELP}), "
        "loaded at start; repeatable \\[default: every run's checkpoints, loaded on first use].",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network (set --api-key)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port; 0 picks a free one."),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="LLMCTL_API_KEY",
        show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1 and /api.",
    ),
    max_loaded: int = typer.Option(
        2, "--max-loaded", min=1, help="Models kept in memory at once; the least recently used leaves."
    ),
    max_tokens: int = typer.Option(
        1024, "--max-tokens", min=1, help="The largest max_tokens a request may ask for."
    ),
    max_body_bytes: int = typer.Option(
        1 << 20, "--max-body-bytes", min=1024, help="Requests with a larger body are refused (413)."
    ),
    max_batch: int = typer.Option(
        16, "--max-batch", min=1, help="Sequences one model decodes at once (each sample of each request)."
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", min=0, help="Sequences that may wait for a free slot; past it requests get 429."
    ),
    max_messages: int = typer.Option(
        512, "--max-messages", min=1, help="Chat requests with more messages are refused (400)."
    ),
    max_connections: int = typer.Option(
        64, "--max-connections", min=1, help="Open connections served at once; past it requests get 503."
    ),
    header_timeout: float = typer.Option(
        10.0,
        "--header-timeout",
        min=0.1,
        help="Seconds a request's headers may take; past it the connection closes.",
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.1, help="Seconds a request's body may take to arrive (408 past it)."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Serve models over an OpenAI-compatible API, with a page to chat, compare and watch runs.

    The page is at http://HOST:PORT/ and the API at http://HOST:PORT/v1, where OpenAI's client
    libraries work (base_url="http://127.0.0.1:8000/v1").

    Examples:

      llmctl serve

      llmctl serve --model code-chat --model code-base:step-2000 --port 8080

      LLMCTL_API_KEY=secret llmctl serve --host 0.0.0.0 --max-loaded 1
    """
    from llmctl.errors import LlmctlError

    try:
        import uvicorn

        from llmctl.serve.app import ServeSettings, bind_socket, create_app, make_pool
        from llmctl.serve.completions import Limits
        from llmctl.serve.transport import ConnectionLimits, server_config
    except ImportError as exc:
        raise LlmctlError(
            f"llmctl serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'llmctl[serve]'"
        ) from None

    if dtype is not None:  # a bad --dtype fails before the port is taken or a model loads
        from llmctl.generate import resolve_device
        from llmctl.model.decode_dtype import resolve_decode_dtype

        resolve_decode_dtype(dtype, resolve_device(device))
    ws = workspace()
    settings = ServeSettings(
        workspace_root=ws.root,
        refs=model,
        max_loaded=max_loaded,
        device=device,
        dtype=dtype,
        api_key=api_key,
        limits=Limits(max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_messages=max_messages),
        max_batch=max_batch,
        max_queue=max_queue,
        connections=ConnectionLimits(
            max_connections=max_connections, header_timeout_s=header_timeout, body_timeout_s=body_timeout
        ),
    )
    sock = bind_socket(host, port)
    pool = make_pool(settings)
    for path in pool.preload():
        note(f"loaded {path}")
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    if host not in LOOPBACK_HOSTS and not api_key:
        warn(f"listening on {host} without --api-key: anyone who can reach this machine can use the models")
    server = uvicorn.Server(server_config(create_app(settings, pool), settings.connections))
    success(f"serving {ws.root} at {url}/  (OpenAI API: {url}/v1) · Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    finally:
        pool.close()
