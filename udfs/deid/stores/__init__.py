"""deid's own vault backends. The interface is here; each backend is a module of its own
(``sqlite``, ``postgres``, ``dynamodb``), imported only when a vault URL names it, so the
embedded default needs none of the others' dependencies."""

from .base import GENESIS, Erasure, NewRecord, NewRecords, Sealer, StoredValue, VaultStore

__all__ = ["GENESIS", "Erasure", "NewRecord", "NewRecords", "Sealer", "StoredValue", "VaultStore"]
