"""Skyflow's vault as a deid token service, over Skyflow's v1 data API (REST).

``DEID_VAULT=skyflow://<cluster>.vault.skyflowapis.com/<vault_id>?credentials=…&policy=…``
makes every host (DuckDB plugin, Lambda handlers, plpython3u) tokenize and detokenize through
Skyflow. The warehouse then holds Skyflow tokens; Skyflow holds the values.

- tokenize: values are normalized by deid's kind rules, deduplicated, then inserted with
  ``tokenization: true`` and ``upsert`` on the kind's unique column, so a re-run or a retried
  batch updates the existing record instead of adding a second one. ``mode=lookup`` uses
  ``/tokenize`` instead (values must already be in the vault; nothing is inserted).
- detokenize: ``/detokenize`` with ``redaction: PLAIN_TEXT`` and ``continueOnError: false``;
  the deid-side policy and hash-chained audit (``policy=<deid vault URL>``) run first, and the
  bearer token carries a ``ctx`` claim with the warehouse user so Skyflow's audit shows who
  re-identified.
- fail closed: a per-record error, an HTTP error after retries, a timeout, a malformed or
  short response fails the whole batch; the error names the operation, kind and HTTP status,
  never a value or a token, and never Skyflow's own message (which may echo the value).

URL parameters are documented in docs/skyflow.md and in `SkyflowSettings`.
"""


from .auth import Credentials, TokenProvider, load_credentials
from .client import SkyflowClient
from .service import SkyflowTokenService, open_service
from .settings import DEFAULT_MAPPING, SkyflowSettings, Target, load_mapping, parse_url

__all__ = [
    "DEFAULT_MAPPING",
    "Credentials",
    "SkyflowClient",
    "SkyflowSettings",
    "SkyflowTokenService",
    "Target",
    "TokenProvider",
    "load_credentials",
    "load_mapping",
    "open_service",
    "parse_url",
]
