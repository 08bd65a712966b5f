"""`python -m service` / `levit-serve`: settings from env and flags, then serve until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from service import logs
from service.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as error:
        print(f"levit-serve: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if settings.instance_kind == "process":
        from service.supervisor import serve as supervise

        return supervise(settings)
    from service.server import Server  # after the settings check (its model thread imports torch)

    async def serve() -> int:
        return await Server(settings).run()

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] ships uvloop
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve())


if __name__ == "__main__":
    sys.exit(main())
