"""deid: de-identify analytics data inside the warehouse.

The public surface: open a token service from a vault URL, then tokenize and detokenize in
batches. Engine hosts (``deid.duckdb_plugin``, ``deid.lambda_handler``, ``deid.plpython_host``)
and vault backends are modules of their own.
"""

from .errors import (
    AuditChainError,
    ConfigError,
    DeidError,
    InvalidKindError,
    InvalidValueError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultKeyError,
    VaultUnavailableError,
)
from .kinds import KINDS, is_token
from .service import TokenService, VaultTokenService
from .vault import VaultConfig, open_service

__all__ = [
    "KINDS",
    "AuditChainError",
    "ConfigError",
    "DeidError",
    "InvalidKindError",
    "InvalidValueError",
    "PermissionDeniedError",
    "TokenService",
    "UnknownTokenError",
    "VaultConfig",
    "VaultKeyError",
    "VaultTokenService",
    "VaultUnavailableError",
    "is_token",
    "open_service",
]
