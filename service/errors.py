"""One error type for everything a client did wrong; the app turns it into a 4xx with a message."""
from __future__ import annotations


class ClientError(Exception):
    """`status`: the HTTP status; `reason`: a short label for the rejections metric; `headers`: extra headers."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.reason, self.headers = message, status, reason, headers or {}


def validation_reasons(errors: list[dict], limit: int = 5) -> str:
    """pydantic's errors as one line: `inputs.0.shape: Field required; ...`, the first `limit` of them."""
    shown = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errors[:limit]]
    return "; ".join(shown) + (f"; and {len(errors) - limit} more" if len(errors) > limit else "")
