"""A local stand-in for Skyflow's v1 data API, following its documented shapes.

What it implements (request and response bodies as in Skyflow's API reference):

- ``POST /v1/auth/sa/oauth/token`` — ``{"grant_type": "urn:ietf:params:oauth:grant-type:
  jwt-bearer", "assertion": <RS256 JWT>, "scope"?: "role:<id> …"}`` → ``{"accessToken",
  "tokenType": "Bearer"}``. The assertion is verified against the registered service account's
  public key (iss = sub = clientID, key = keyID, aud = tokenURI, exp in the future); its
  optional ``ctx`` claim is carried into the access token and into each request's log entry.
- ``POST /v1/vaults/<id>/<table>`` — insert ``{"records": [{"fields": {…}}], "tokenization":
  true, "upsert": "<unique column>"}`` → ``{"records": [{"skyflow_id", "tokens": {…}}]}``.
  Without ``upsert`` a value already in a unique column is a 409, as in a real vault.
- ``POST /v1/vaults/<id>/tokenize`` — ``{"tokenizationParameters": [{"value", "columnGroup"}]}``
  → ``{"records": [{"token"}]}`` for values already in the vault.
- ``POST /v1/vaults/<id>/detokenize`` — ``{"detokenizationParameters": [{"token",
  "redaction"}], "continueOnError"}`` → ``{"records": [{"token", "valueType", "value"}]}``;
  an unknown token is a 404 unless continueOnError, which puts ``"error"`` on the record.
- ``DELETE /v1/vaults/<id>/<table>`` — bulk delete ``{"skyflow_ids": ["…"]}`` →
  ``{"RecordIDResponse": ["…"]}``. The records' values and their tokens are gone: a deleted
  record's token is "not found" by detokenize, and the value inserted again gets a new token
  (unless ``reissue_tokens_after_delete`` is set, which models a column whose deterministic
  tokens are derived from the value and so come back unchanged).
- Errors: ``{"error": {"grpc_code", "http_code", "http_status", "message", "details": []}}``
  with an ``x-request-id`` header. Messages quote the offending value, as real services may,
  so tests can check that a client never repeats them.

Deterministic tokens: one UUID per (table, column, value), like a column configured with
"UUID deterministic" tokens. Roles: a bearer token requested with ``scope`` only has those
roles; each role allows some of insert / tokenize / detokenize.

Fault injection for tests: `FakeSkyflow.inject(op, …)` queues faults (HTTP status with an
error body and Retry-After, a delay, a raw body, a per-record error, apply-then-fail).

Run it alone (for trying the backend by hand)::

    python tests/python/fake_skyflow.py --port 8787 --credentials /tmp/sf-creds.json
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

VAULT_ID = "a1b2c3d4e5f6"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_PATH = "/v1/auth/sa/oauth/token"

# table -> column -> column group (for /tokenize). Every column is unique and tokenized.
DEFAULT_SCHEMA: dict[str, dict[str, str]] = {
    "persons": {"email": "email_group", "phone_number": "phone_group", "ssn": "ssn_group",
                "name": "name_group", "address": "address_group",
                "date_of_birth": "dob_group", "email_marketing": "email_marketing_group"},
    "credit_cards": {"card_number": "card_group"},
    "deid_strings": {"value": "string_group"},
}

ALL_OPS = frozenset({"insert", "tokenize", "detokenize", "delete"})

_STATUS_TEXT = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error",
                502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 502: 14, 503: 14, 504: 4}


@dataclass
class Fault:
    """One injected misbehaviour, consumed by the next matching request."""

    status: int | None = None  # answer this HTTP status with a Skyflow error body
    retry_after: str | None = None
    delay: float = 0.0  # sleep before answering (timeouts)
    raw: bytes | None = None  # answer HTTP 200 with exactly these bytes (malformed)
    record_error: int | None = None  # answer 200 but put "error" on this record index
    apply_first: bool = False  # perform the operation, then answer `status` (lost reply)
    drop_records: int = 0  # answer 200 with this many records missing from the end
    location: str | None = None  # a Location header (redirects)


@dataclass
class ServiceAccount:
    client_id: str
    key_id: str
    private_pem: str
    public_key: Any
    roles: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass
class Logged:
    op: str
    body: dict[str, Any]
    ctx: Any
    scope: str | None
    status: int


class FakeSkyflow:
    """The server's state. Start with `start()`; `url` and `vault_url()` tell where it is."""

    def __init__(self, *, schema: dict[str, dict[str, str]] | None = None,
                 token_ttl: float = 3600.0, reissue_tokens_after_delete: bool = False) -> None:
        self.schema = schema or DEFAULT_SCHEMA
        self.reissue_tokens_after_delete = reissue_tokens_after_delete
        self.clock = time.time  # when access tokens are issued and expire
        self.token_ttl = token_ttl
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self.accounts: dict[str, ServiceAccount] = {}
        # table -> skyflow_id -> fields
        self.records: dict[str, dict[str, dict[str, str]]] = {t: {} for t in self.schema}
        self._tokens: dict[tuple[str, str, str], str] = {}  # (table, column, value) -> token
        self._values: dict[str, tuple[str, str, str]] = {}  # token -> (table, column, value)
        self._index: dict[tuple[str, str, str], str] = {}  # (table, column, value) -> record
        self.faults: dict[str, deque[Fault]] = {}
        self.log: list[Logged] = []
        self.exchanges: list[dict[str, Any]] = []  # verified assertion claims + scope
        self._revoked_before = 0.0
        # Set to "REDACTED" or "MASKED" to answer as Skyflow does for a role whose policy
        # grants less than plain text: the placeholder or a masked form, with HTTP 200.
        self.role_redaction: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeSkyflow:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def vault_url(self, **params: str) -> str:
        """A deid ``DEID_VAULT`` URL for this server (scheme=http is added)."""
        from urllib.parse import urlencode

        query = urlencode({"scheme": "http", **params})
        return f"skyflow://127.0.0.1:{self.port}/{VAULT_ID}?{query}"

    # -- service accounts ----------------------------------------------------------------------

    def add_service_account(self, roles: dict[str, set[str]] | None = None) -> ServiceAccount:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        sa = ServiceAccount(f"c{uuid.uuid4().hex}", f"k{uuid.uuid4().hex}", pem,
                            key.public_key(),
                            {r: frozenset(ops) for r, ops in (roles or {}).items()})
        with self._lock:
            self.accounts[sa.client_id] = sa
        return sa

    def credentials_json(self, sa: ServiceAccount) -> str:
        return json.dumps({"clientID": sa.client_id, "clientName": "deid-test",
                           "keyID": sa.key_id, "tokenURI": self.url + TOKEN_PATH,
                           "privateKey": sa.private_pem})

    def write_credentials(self, path: Path, sa: ServiceAccount | None = None) -> Path:
        sa = sa or self.add_service_account()
        path.write_text(self.credentials_json(sa))
        path.chmod(0o600)
        return path

    def revoke_tokens(self) -> None:
        """Every access token issued so far is refused from now on (401)."""
        self._revoked_before = time.time() + 1e-6

    # -- faults and inspection -----------------------------------------------------------------

    def inject(self, op: str, fault: Fault | None = None, *, times: int = 1, **kw: Any) -> None:
        """Queue a fault for the next `times` requests of `op` (token, insert, tokenize,
        detokenize)."""
        f = fault or Fault(**kw)
        with self._lock:
            q = self.faults.setdefault(op, deque())
            for _ in range(times):
                q.append(f)

    def _next_fault(self, op: str) -> Fault | None:
        with self._lock:
            q = self.faults.get(op)
            return q.popleft() if q else None

    def record_count(self, table: str) -> int:
        with self._lock:
            return len(self.records[table])

    def values(self, table: str, column: str) -> list[str]:
        """The values stored in one column, one per record holding it."""
        with self._lock:
            return [f[column] for f in self.records[table].values() if column in f]

    def requests(self, op: str) -> list[Logged]:
        with self._lock:
            return [e for e in self.log if e.op == op]

    def token_for(self, table: str, column: str, value: str) -> str | None:
        return self._tokens.get((table, column, value))

    # -- the API -----------------------------------------------------------------------------

    def issue(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("grant_type") != GRANT_TYPE or not isinstance(body.get("assertion"), str):
            return _error(400, "grant_type must be jwt-bearer and assertion a JWT")
        assertion = body["assertion"]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            sa = self.accounts[unverified["iss"]]
            claims = jwt.decode(assertion, sa.public_key, algorithms=["RS256"],
                                audience=self.url + TOKEN_PATH,
                                options={"require": ["exp", "iss", "sub", "aud", "key"]})
        except (jwt.PyJWTError, KeyError):
            return _error(401, "invalid assertion")
        if claims["sub"] != sa.client_id or claims["key"] != sa.key_id:
            return _error(401, "assertion key or subject does not match the service account")
        roles = set(sa.roles) if sa.roles else {"*"}
        scope = body.get("scope")
        if scope is not None:
            asked = {s.removeprefix("role:") for s in str(scope).split()}
            if not all(s.startswith("role:") for s in str(scope).split()) or not asked <= roles:
                return _error(400, f"scope {scope} is not a subset of the account's roles")
            roles = asked
        now = self.clock()
        access = jwt.encode({"sub": sa.client_id, "iat": now, "exp": now + self.token_ttl,
                             "roles": sorted(roles), "ctx": claims.get("ctx"),
                             "scope": scope, "jti": uuid.uuid4().hex},
                            self._secret, algorithm="HS256")
        with self._lock:
            self.exchanges.append({**claims, "scope": scope})
        return 200, {"accessToken": access, "tokenType": "Bearer"}

    def authorize(self, header: str | None, op: str) -> tuple[int, dict[str, Any]] | dict:
        if not header or not header.startswith("Bearer "):
            return _error(401, "missing bearer token")
        try:
            claims = jwt.decode(header[7:], self._secret, algorithms=["HS256"],
                                options={"verify_iat": False})
        except jwt.PyJWTError:
            return _error(401, "invalid or expired bearer token")
        if claims["iat"] < self._revoked_before:
            return _error(401, "bearer token revoked")
        sa = self.accounts.get(claims["sub"])
        if sa is None:
            return _error(401, "unknown service account")
        if sa.roles:
            allowed = set().union(*(sa.roles.get(r, frozenset()) for r in claims["roles"]))
            if op not in allowed:
                return _error(403, f"the token's roles do not allow {op}")
        return claims

    def insert(self, table: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        columns = self.schema.get(table)
        if columns is None:
            return _error(404, f"table {table} not found in vault {VAULT_ID}")
        records = body.get("records")
        if not isinstance(records, list) or not records:
            return _error(400, "records must be a non-empty list")
        upsert = body.get("upsert")
        if upsert is not None and upsert not in columns:
            return _error(400, f"upsert column {upsert} is not a unique column of {table}")
        out = []
        with self._lock:
            # All or nothing: stage the batch, commit only when every record is valid.
            staged: dict[str, dict[str, str]] = {}
            index: dict[tuple[str, str, str], str] = {}
            for rec in records:
                fields = rec.get("fields") if isinstance(rec, dict) else None
                if not isinstance(fields, dict) or not fields:
                    return _error(400, "each record needs fields")
                for col, val in fields.items():
                    if col not in columns:
                        return _error(400, f"column {col} not in table {table} (value {val})")
                    if not isinstance(val, str):
                        return _error(400, f"value {val} of {col} is not a string")
                    if len(val) > 2500:
                        return _error(400, f"value {val} exceeds 2500 characters")
            for rec in records:
                fields = rec["fields"]

                def find(col: str, val: str) -> str | None:
                    key = (table, col, val)
                    return index.get(key) or self._index.get(key)

                existing = None
                if upsert is not None and upsert in fields:
                    existing = find(upsert, fields[upsert])
                else:
                    for col, val in fields.items():
                        if find(col, val) is not None:
                            return _error(409, f"duplicate value {val} for unique column {col}")
                sid = existing or str(uuid.uuid4())
                staged.setdefault(sid, dict(self.records[table].get(sid, {}))).update(fields)
                for col, val in fields.items():
                    index[(table, col, val)] = sid
                tokens = {}
                if body.get("tokenization"):
                    for col, val in fields.items():
                        tokens[col] = self._token(table, col, val)
                out.append({"skyflow_id": sid, **({"tokens": tokens} if tokens else {})})
            self.records[table].update(staged)
            self._index.update(index)
        return 200, {"records": out}

    def _token(self, table: str, column: str, value: str) -> str:
        key = (table, column, value)
        token = self._tokens.get(key)
        if token is None:
            token = str(uuid.uuid4())
            self._tokens[key] = token
        self._values[token] = key
        return token

    def delete(self, table: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if table not in self.schema:
            return _error(404, f"table {table} not found in vault {VAULT_ID}")
        ids = body.get("skyflow_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return _error(400, "skyflow_ids must be a non-empty list of record IDs")
        with self._lock:
            missing = [i for i in ids if i not in self.records[table]]
            if missing:
                return _error(404, f"record {missing[0]} not found")
            for sid in dict.fromkeys(ids):
                for col, val in self.records[table].pop(sid).items():
                    key = (table, col, val)
                    self._index.pop(key, None)
                    self._values.pop(self._tokens.get(key, ""), None)
                    if not self.reissue_tokens_after_delete:
                        self._tokens.pop(key, None)
        return 200, {"RecordIDResponse": list(dict.fromkeys(ids))}

    def tokenize(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        params = body.get("tokenizationParameters")
        if not isinstance(params, list) or not params:
            return _error(400, "tokenizationParameters must be a non-empty list")
        groups = {g: (t, c) for t, cols in self.schema.items() for c, g in cols.items()}
        out = []
        with self._lock:
            for p in params:
                where = groups.get(p.get("columnGroup")) if isinstance(p, dict) else None
                if where is None:
                    return _error(400, "unknown columnGroup")
                token = self._tokens.get((*where, p.get("value")))
                if token is None:
                    return _error(404, f"no record holds value {p.get('value')}")
                out.append({"token": token})
        return 200, {"records": out}

    def detokenize(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        params = body.get("detokenizationParameters")
        if not isinstance(params, list) or not params:
            return _error(400, "detokenizationParameters must be a non-empty list")
        go_on = bool(body.get("continueOnError"))
        out = []
        with self._lock:
            for p in params:
                token = p.get("token") if isinstance(p, dict) else None
                found = self._values.get(token) if isinstance(token, str) else None
                if found is None:
                    if not go_on:
                        return _error(404, f"Token {token} not found")
                    out.append({"token": token, "valueType": "NONE", "value": "",
                                "error": "Token Not Found"})
                    continue
                value = found[2]
                if p.get("redaction", "DEFAULT") != "PLAIN_TEXT" \
                        or self.role_redaction == "REDACTED":
                    value = "*REDACTED*"
                elif self.role_redaction == "MASKED":
                    value = "X" * max(len(value) - 4, 0) + value[-4:]
                out.append({"token": token, "valueType": "STRING", "value": value})
        return 200, {"records": out}


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"grpc_code": _GRPC.get(status, 2), "http_code": status,
                              "http_status": _STATUS_TEXT.get(status, "Error"),
                              "message": message, "details": []}}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeSkyflow
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: dict[str, Any] | bytes,
              headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", uuid.uuid4().hex)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_DELETE(self) -> None:
        self.do_POST(method="DELETE")

    def do_POST(self, method: str = "POST") -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send(*_error(400, "body is not JSON"))
            return
        path = self.path.split("?", 1)[0]
        prefix = f"/v1/vaults/{VAULT_ID}/"
        if method == "DELETE":
            if not (path.startswith(prefix) and "/" not in path[len(prefix):]):
                self._send(*_error(404, f"no route DELETE {path}"))
                return
            op = "delete"
        elif path == TOKEN_PATH:
            op = "token"
        elif path == prefix + "tokenize":
            op = "tokenize"
        elif path == prefix + "detokenize":
            op = "detokenize"
        elif path.startswith(prefix) and "/" not in path[len(prefix):]:
            op = "insert"
        else:
            self._send(*_error(404, f"no route {path}"))
            return
        fault = fake._next_fault(op)
        if fault and fault.delay:
            time.sleep(fault.delay)
        ctx, scope = None, None
        if op == "token":
            status, payload = fake.issue(body) if not (fault and fault.status) else (0, {})
        else:
            claims = fake.authorize(self.headers.get("Authorization"), op)
            if isinstance(claims, tuple):
                status, payload = claims
                fault = None
            else:
                ctx, scope = claims.get("ctx"), claims.get("scope")
                status, payload = 0, {}
                if not (fault and fault.status and not fault.apply_first):
                    if op == "insert":
                        status, payload = fake.insert(path[len(prefix):], body)
                    elif op == "tokenize":
                        status, payload = fake.tokenize(body)
                    elif op == "delete":
                        status, payload = fake.delete(path[len(prefix):], body)
                    else:
                        status, payload = fake.detokenize(body)
        headers = {}
        if fault is not None:
            if fault.status:
                status, payload = _error(fault.status, "injected fault")
                if fault.retry_after is not None:
                    headers["Retry-After"] = fault.retry_after
                if fault.location is not None:
                    headers["Location"] = fault.location
            elif fault.raw is not None and status == 200:
                payload = fault.raw
            elif fault.record_error is not None and status == 200:
                rec = payload["records"][fault.record_error]
                rec["error"] = "Invalid value for this column"
            elif fault.drop_records and status == 200:
                payload["records"] = payload["records"][: -fault.drop_records]
        with fake._lock:
            fake.log.append(Logged(op, body, ctx, scope, status))
        self._send(status, payload, headers)


def main() -> None:  # pragma: no cover - a manual convenience
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8787)
    ap.add_argument("--credentials", type=Path, required=True,
                    help="where to write the service account's credentials.json")
    args = ap.parse_args()
    fake = FakeSkyflow().start(args.port)
    fake.write_credentials(args.credentials)
    print(f"DEID_VAULT='{fake.vault_url(credentials=str(args.credentials), policy='skyflow')}'",
          flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
