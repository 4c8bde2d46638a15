"""`tunesmith deploy`: bind the port, then serve serve/app.py's API and chat page with uvicorn while the model loads
in the background; the server stops when the load fails."""

from __future__ import annotations

import socket

from tunesmith.args import DeployArgs
from tunesmith.errors import UserError
from tunesmith.serve.app import Backend, create_app, is_loopback_host
from tunesmith.serve.server import Server, server_config
from tunesmith.session import load_for_generation, parse_adapter_specs


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading, so a taken port is one clear sentence rather than a traceback minutes later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host.")


def deploy(args: DeployArgs) -> int:
    if not args.model and not args.adapters:
        raise UserError("no --model or --adapters given; pass a model folder, a .gguf file, 'smollm2-135m-instruct' "
                        "or LoRA checkpoints (NAME=CKPT).")
    parse_adapter_specs(args.adapters)  # a wrong checkpoint path fails now, not after the server is up
    sock = listen(args.host, args.port)
    app = create_app(lambda: load_for_generation(args), args)
    backend: Backend = app.state.backend
    server = Server(server_config(app), before_shutdown=backend.begin_shutdown)  # open streams end with [DONE]
    backend.on_failure = lambda: setattr(server, "should_exit", True)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tunesmith deploy: loading the model; OpenAI API at http://{host}:{args.port}/v1, "
          f"chat page at http://{host}:{args.port}/ (GET /health turns 200 when ready)", flush=True)
    if not args.api_key and not is_loopback_host(args.host):
        print(f"tunesmith deploy: no --api_key, so only requests addressed to localhost, 127.0.0.1 or [::1] are "
              f"answered (others get 403); pass --api_key KEY to serve clients that reach {host} by another name.",
              flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; that is a normal stop
        pass
    return 1 if backend.error else 0
