"""`tunesmith web-ui`: the studio (studio/app.py) on the same uvicorn server as `deploy` (serve/server.py). It works
in --workdir: the page's uploads, runs, exports and job records live there, and the jobs it starts (the real CLI)
run with it as their working folder, as the command lines it shows assume."""

from __future__ import annotations

import os

from tunesmith.args import WebUIArgs
from tunesmith.commands.deploy import listen
from tunesmith.errors import UserError
from tunesmith.serve.app import is_loopback_host
from tunesmith.serve.server import Server, server_config


def web_ui(args: WebUIArgs) -> int:
    if not is_loopback_host(args.host) and not args.api_key:
        raise UserError(f"--host {args.host} lets other machines reach the studio, which can read and write "
                        f"--workdir and start jobs, so it needs --api_key KEY; pass one, or leave --host at 127.0.0.1.")
    from tunesmith.studio.app import create_app
    from tunesmith.studio.paths import Workdir

    try:
        workdir = Workdir(args.workdir, args.models)
    except OSError as e:
        raise UserError(f"--workdir {args.workdir}: cannot use it ({e.strerror}); pick a folder you can write.")
    for p in args.models:
        if not os.path.exists(p):
            raise UserError(f"--models {p}: no such folder or file; pass a model folder or a .gguf file.")
    sock = listen(args.host, args.port)
    os.chdir(workdir.root)  # the jobs' relative paths (data/, runs/) are the workdir's, in a terminal too
    app = create_app(workdir, args.api_key, args.lang, args.max_upload_mb << 20)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tunesmith web-ui: http://{host}:{args.port}/  (workdir {workdir.root})", flush=True)
    try:
        Server(server_config(app)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0
