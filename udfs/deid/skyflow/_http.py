"""HTTP pieces shared by the bearer-token exchange and the data client: bearer auth, capped
retries, and error descriptions that never carry Skyflow's own message."""

from __future__ import annotations

import re
from typing import Any

# The skyflow extra (deid[skyflow]); vault._load turns a missing one into a ConfigError.
import requests
import requests.auth
from urllib3 import exceptions as urllib3_exc
from urllib3.util.retry import Retry

# ---------------------------------------------------------------------------------------
# HTTP


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:  # never print the token
        return "_Bearer(…)"


def _retry_class(cap: float) -> type[Retry]:
    class CappedRetry(Retry):
        """Honours Retry-After, but never sleeps longer than `max_retry_after` at once: a
        UDF call has a deadline (Lambda, dbt) and a long wait would only time it out."""

        def get_retry_after(self, response: Any) -> float | None:
            value = super().get_retry_after(response)
            return None if value is None else min(value, cap)

    return CappedRetry


def _transport(exc: Exception) -> str:
    # After retries, requests wraps a read timeout in a ConnectionError: look at the reason.
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(exc, requests.Timeout) or isinstance(reason, urllib3_exc.TimeoutError):
        return "timed out"
    if isinstance(exc, requests.exceptions.RetryError):
        return "too many retries"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return exc.__class__.__name__


def _request_id(resp: requests.Response) -> str:
    rid = resp.headers.get("x-request-id")
    if rid and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid):
        return f", Skyflow request id {rid}"
    return ""


def _error_code(resp: requests.Response) -> str:
    """Skyflow's error body is {"error": {grpc_code, http_code, http_status, message, details}}.
    Only the codes are kept: the message may quote the value that was refused."""
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(err, dict):
        return ""
    grpc = err.get("grpc_code")
    status = err.get("http_status")
    out = []
    if isinstance(status, str) and re.fullmatch(r"[A-Za-z ]{1,40}", status):
        out.append(status)
    if isinstance(grpc, int):
        out.append(f"gRPC code {grpc}")
    return f" ({', '.join(out)})" if out else ""
