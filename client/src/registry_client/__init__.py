"""Model Registry client: `RegistryClient` (the SDK) and the `registry` command."""

from registry_client.client import RegistryClient
from registry_client.errors import ExitCode, RegistryError

__all__ = ["ExitCode", "RegistryClient", "RegistryError"]
