"""``svdq-server``: run the service until SIGTERM or SIGINT (see ``svdq-server --help``)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from svdq.errors import SvdqError

from .app import SvdqServer, configure_logging
from .config import parse_settings

log = logging.getLogger("svdq_server")


async def _serve(server: SvdqServer) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(server.stop()))
    await server.start()
    await server.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``svdq-server`` console script; returns the exit status."""
    settings = parse_settings(argv)
    configure_logging(settings.log_format, settings.log_level)
    try:
        server = SvdqServer(settings, dict(os.environ))
        asyncio.run(_serve(server))
    except (SvdqError, OSError, RuntimeError) as exc:
        log.error("cannot start svdq-server: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
