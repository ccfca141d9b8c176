"""rdserve's Python client: ``Client`` (blocking) and ``AsyncClient`` (asyncio), numpy out."""

from rdserve_client.aio import AsyncClient, AsyncJob, plan_parts
from rdserve_client.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    RdserveError,
    ServerError,
    ServiceUnavailableError,
)
from rdserve_client.sync import Client, Job

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Job",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "RdserveError",
    "ServerError",
    "ServiceUnavailableError",
    "plan_parts",
]
