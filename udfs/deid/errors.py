"""Errors raised by deid.

Every message names what was wrong (the kind, the column label, the row within the batch,
the limit) and what to do. No message ever contains a value or a token: error text ends up
in dbt logs, warehouse query history and CloudWatch, which are not places for secrets.
"""

from __future__ import annotations


class DeidError(Exception):
    """Base class of every error deid raises on purpose."""


class ConfigError(DeidError):
    """The vault URL, a key source or a plugin setting is wrong or missing."""


class InvalidKindError(DeidError):
    """The kind argument of tokenize is not one deid knows, or its domain is malformed."""


class InvalidValueError(DeidError):
    """A value cannot be tokenized as its kind (malformed, or over the kind's limit).

    Carries the kind, column label and 1-based row within the batch so hosts can report
    where the problem is; the offending value itself is deliberately not kept.
    """

    def __init__(self, kind: str, reason: str, *, row: int | None = None,
                 column: str | None = None) -> None:
        self.kind = kind
        self.reason = reason
        self.row = row
        self.column = column
        where = f"column {column!r}, " if column else ""
        at = f"row {row} of the batch" if row is not None else "a value"
        super().__init__(
            f"deid.tokenize: {where}kind {kind!r}, {at}: {reason} "
            "(the value is not shown; fix it in the source or choose another kind)"
        )


class UnknownTokenError(DeidError):
    """detokenize was given something that is not a token held by this vault."""


class ErasedTokenError(UnknownTokenError):
    """detokenize was given a token whose vault record was erased (``deid forget``).

    A subclass of UnknownTokenError, so code that treats unknown tokens as failures keeps
    failing closed; the distinct class (and message) tells a person the value was forgotten
    on purpose, not lost or forged.
    """


class PermissionDeniedError(DeidError):
    """The principal is not in the vault's detokenize policy."""


class VaultUnavailableError(DeidError):
    """The vault store or its keys cannot be reached or read; nothing was written."""

    #: The PostgreSQL error code behind it, when there is one (the plpython3u host reports
    #: it as the statement's SQLSTATE, so a deadlock or a lock timeout stays one).
    sqlstate: str | None = None


class AuditChainError(DeidError):
    """The audit log does not verify: a record was altered, removed, reordered or forged.
    Names the first bad record's sequence number, never its content."""


class VaultKeyError(DeidError):
    """The keys do not belong to this vault, or a key version is missing."""


class StaleKeyVersionError(VaultKeyError):
    """Values were encrypted under a key version older than the vault's current one: another
    process rotated the keys. The token service reloads its keys and encrypts again."""


class VaultNotFoundError(VaultUnavailableError):
    """No vault exists where the URL points; deid creates one only through `deid init`."""
