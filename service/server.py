"""Run the app under uvicorn with structured logs; exit non-zero if the model cannot load."""

from __future__ import annotations

import json
import logging
import sys

import uvicorn

from service.api.app import create_app
from service.connections import (
    EveryFileLimitOnceASecond,
    connection_cap,
    protocol_with_head_timeout,
    raise_open_file_limit,
)
from service.scheduler.memory import map_large_allocations
from service.settings import ServiceSettings

# record attributes that are not "extra" fields; uvicorn's color_message repeats the message with ANSI codes
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any extra fields (request_id, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(json_lines: bool) -> None:
    """One handler at the root; transformers' own (coloured, prefixed) handler is replaced by propagation,
    and with JSON lines its progress bars are off, so every line on stderr is one JSON object."""
    from transformers.utils import logging as transformers_logging

    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
        transformers_logging.disable_progress_bar()
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("uvicorn.access").disabled = True  # our access log carries the request id


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT the scheduler stops admitting at once and answers waiting requests 503,
    while uvicorn lets the running ones finish (within the grace period) before it exits."""

    def __init__(self, config: uvicorn.Config, app, grace_s: float) -> None:
        super().__init__(config)
        self._app, self._grace_s = app, grace_s

    def handle_exit(self, sig: int, frame) -> None:
        scheduler = getattr(self._app.state, "scheduler", None)
        if scheduler is not None:
            scheduler.begin_shutdown(self._grace_s)
        super().handle_exit(sig, frame)


def serve(settings: ServiceSettings) -> None:
    configure_logging(settings.log_json)
    threads = settings.apply_threads()
    open_files = raise_open_file_limit()
    map_large_allocations()  # memory bounded by what is in use, not by how many threads once decoded
    logging.getLogger("asyncio").addFilter(EveryFileLimitOnceASecond())
    logging.getLogger(__name__).info("torch uses %d CPU threads; up to %d open files", threads, open_files)
    holder: dict[str, uvicorn.Server] = {}
    failures: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    # One process, one worker: the model is loaded once; more uvicorn workers would load it again.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        workers=1,
        http=protocol_with_head_timeout(settings.header_timeout_s, connection_cap(open_files)),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=settings.shutdown_grace_s + 5,  # the scheduler answers everyone within the grace
    )
    server = holder["server"] = DrainingServer(config, app, settings.shutdown_grace_s)
    server.run()
    if failures:
        sys.exit(1)
