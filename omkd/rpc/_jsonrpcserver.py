"""The pieces of jsonrpcserver (pinned at 5.0.9) that work under trio, imported in one place.

Its ``async_dispatch`` gathers with asyncio and fails under trio; ``dispatch_request`` of its
async dispatcher, ``to_response`` and the result types do not. Its import reads a resource
with an API deprecated on 3.11; that warning is silenced here, and only here, so the daemon
starts the same under ``-W error``.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jsonrpcserver import Error, Success
    from jsonrpcserver.async_dispatcher import dispatch_request
    from jsonrpcserver.dispatcher import to_response
    from jsonrpcserver.request import Request
    from jsonrpcserver.sentinels import NODATA, NOID
    from oslash.either import Left

__all__ = [
    "NODATA",
    "NOID",
    "Error",
    "Left",
    "Request",
    "Success",
    "dispatch_request",
    "to_response",
]
