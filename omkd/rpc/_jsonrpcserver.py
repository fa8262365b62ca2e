"""The pieces of jsonrpcserver (pinned at 5.0.9) that work under trio, imported in one place.

Its ``async_dispatch`` gathers with asyncio and fails under trio; ``call`` of its async
dispatcher (which runs a method and turns what it raises into an error result) and the
result types do not. Its ``dispatch_request`` works too, but binds the params against the
method's signature with ``inspect`` on every call (about 10% of the daemon's time in a
profile), which msgspec has already done: the dispatcher looks the method up itself and
hands it to ``call``, and reads the result itself (``to_response`` only copies it). Its
import reads a resource with an API deprecated on 3.11; that warning is silenced here, and
only here, so the daemon starts the same under ``-W error``.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jsonrpcserver import Error, Success
    from jsonrpcserver.async_dispatcher import call
    from jsonrpcserver.request import Request
    from jsonrpcserver.result import MethodNotFoundResult
    from jsonrpcserver.sentinels import NODATA, NOID
    from oslash.either import Left

__all__ = [
    "NODATA",
    "NOID",
    "Error",
    "Left",
    "MethodNotFoundResult",
    "Request",
    "Success",
    "call",
]
