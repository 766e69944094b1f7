"""astguard-serve / python -m service: serve an astguard ONNX model over HTTP.

Every option is also an environment variable: --max-wait-ms is ASTGUARD_MAX_WAIT_MS. Options win.
"""
from __future__ import annotations

import argparse
import sys
import typing

from pydantic import ValidationError

from astguard.cli import Parser

from service.config import Settings
from service.errors import validation_reasons
from service.runtime import StartupError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="astguard-serve", description=__doc__.split("\n\n")[0],
                epilog="Every option is also ASTGUARD_<OPTION> in the environment (e.g. ASTGUARD_API_KEYS).")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default_factory is None else "CPUs available"
        help_text = f"{field.description} (env ASTGUARD_{name.upper()}, default: {default})"
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal \
                else None
            p.add_argument(flag, default=None, choices=choices, help=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**given)
        from service.app import create_app

        app = create_app(settings)
    except ValidationError as e:
        print(f"astguard-serve: error: bad setting: {validation_reasons(e.errors())}", file=sys.stderr)
        return 2
    except (StartupError, ValueError, OSError) as e:
        print(f"astguard-serve: error: {e}", file=sys.stderr)
        return 2
    import logging

    import uvicorn

    # The service's own lines (a disconnect, a flag, a refusal) beside uvicorn's, at the same level.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    own = logging.getLogger("astguard")
    own.addHandler(handler)
    own.setLevel(getattr(logging, settings.log_level.upper(), logging.DEBUG))  # uvicorn's "trace": everything
    own.propagate = False

    from service.server import guarded_protocol

    protocol = guarded_protocol(settings.header_timeout_s, settings.max_connections,
                                lambda reason: app.state.service.metrics.rejections.labels(reason).inc())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                http=protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
