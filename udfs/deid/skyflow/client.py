"""The JSON-over-HTTPS client: pooled connections, retries and bearer tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

# The skyflow extra (deid[skyflow]); vault._load turns a missing one into a ConfigError.
import requests
import requests.auth
from requests.adapters import HTTPAdapter

from ..errors import (
    PermissionDeniedError,
    UnknownTokenError,
    VaultUnavailableError,
)
from ._http import _Bearer, _error_code, _request_id, _retry_class, _transport
from .auth import Credentials, TokenProvider
from .settings import _RETRY_STATUSES, SkyflowSettings

log = logging.getLogger("deid.skyflow")

class SkyflowClient:
    """POSTs JSON to the vault with pooled connections, retries and bearer tokens."""

    def __init__(self, settings: SkyflowSettings, credentials: Credentials, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.session = requests.Session()
        retry = _retry_class(settings.max_retry_after)(
            total=settings.retries, connect=settings.retries, read=settings.retries,
            status=settings.retries, other=0,
            backoff_factor=settings.backoff, backoff_max=max(settings.backoff * 16, 1.0),
            # 409: two writers upserting one new value at once (two dbt models tokenizing
            # the same customer ids); the retry finds the record and updates it.
            status_forcelist=_RETRY_STATUSES,
            # Every call is idempotent: insert upserts on a unique column, the rest read.
            allowed_methods=frozenset({"POST"}),
            respect_retry_after_header=True, raise_on_status=False,
        )
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(settings.concurrency, 4) * 2,
                              max_retries=retry)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self.tokens = TokenProvider(credentials, self.session, timeout=self.timeout,
                                    refresh_margin=settings.refresh_margin, clock=clock)

    def post(self, path: str, body: dict[str, Any], *, what: str, scope: str | None = None,
             ctx: dict[str, str] | None = None) -> dict[str, Any]:
        """The decoded JSON object of a 200 answer; anything else raises, naming `what`."""
        return self._send("POST", path, body, what=what, scope=scope, ctx=ctx)

    def delete(self, path: str, body: dict[str, Any], *, what: str,
               scope: str | None = None) -> dict[str, Any]:
        """A DELETE with a JSON body (bulk record delete). Not retried after a lost answer:
        a repeated delete of records already gone would fail."""
        return self._send("DELETE", path, body, what=what, scope=scope, ctx=None)

    def _send(self, method: str, path: str, body: dict[str, Any], *, what: str,
              scope: str | None, ctx: dict[str, str] | None) -> dict[str, Any]:
        url = self.settings.vault_url + path
        for attempt in (1, 2):
            bearer = self.tokens.bearer(scope, ctx)
            try:
                # auth= (not a header) so a ~/.netrc entry can never replace the bearer
                # token; no redirects, so the token never follows a 3xx elsewhere.
                resp = self.session.request(method, url, json=body, timeout=self.timeout,
                                            auth=_Bearer(bearer), allow_redirects=False)
            except requests.RequestException as exc:
                raise VaultUnavailableError(
                    f"{what}: Skyflow {_transport(exc)} after {self.settings.retries} "
                    "retries") from None
            if resp.status_code == 401 and attempt == 1:
                # Revoked or expired early: one fresh token, then give up.
                self.tokens.invalidate(bearer)
                continue
            break
        status = resp.status_code
        log.debug("skyflow %s -> HTTP %s", path.rsplit("/", 1)[-1], status)
        if status != 200:
            detail = f"HTTP {status}{_error_code(resp)}{_request_id(resp)}"
            if status == 403:
                raise PermissionDeniedError(
                    f"{what}: Skyflow refused the service account ({detail}); check its "
                    "roles and the vault's policies")
            if status in (400, 404) and path.endswith("/detokenize"):
                raise UnknownTokenError(
                    f"{what}: Skyflow does not hold a token of the batch ({detail}; the "
                    "token is not shown)")
            raise VaultUnavailableError(f"{what}: Skyflow answered {detail}"
                                        + (" after retries" if status in _RETRY_STATUSES
                                           else ""))
        try:
            doc = resp.json()
        except ValueError:
            raise VaultUnavailableError(f"{what}: Skyflow answered HTTP 200 with a body that "
                                        "is not JSON (malformed response)") from None
        if not isinstance(doc, dict):
            raise VaultUnavailableError(f"{what}: Skyflow answered HTTP 200 with a body that "
                                        "is not a JSON object (malformed response)")
        return doc

    def close(self) -> None:
        self.session.close()
