"""Label stores on remote fsspec filesystems (``s3://``, ``gs://``, ...): a preflight that turns the
usual failures into one-line errors before zarr sees the URL.

Storage options are fsspec's own configuration, so every command (and every torchrun rank) reads a
remote store the same way without extra flags:

* ``FSSPEC_<PROTOCOL>_<OPTION>=value`` environment variables, e.g. ``FSSPEC_S3_ENDPOINT_URL=http://
  minio.local:9000`` for an S3-compatible server or ``FSSPEC_S3_ANON=true`` for a public bucket;
  ``FSSPEC_<PROTOCOL>='{"json": "object"}'`` for nested options; or JSON files in
  ``$FSSPEC_CONFIG_DIR`` (default ``~/.config/fsspec``);
* credentials through the backend's own chain (S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, ``~/.aws/credentials``, instance roles).

``check_remote`` costs one or two metadata requests per URL and process (successes are cached).
"""
from __future__ import annotations

from mealkd.errors import UserError, first_line

_checked: set[str] = set()

_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "DefaultCredentialsError",
                      "RefreshError", "ClientAuthenticationError"}
_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                      "ServerTimeoutError", "ConnectionError", "TimeoutError"}


def _names(err: BaseException) -> set[str]:
    return {t.__name__ for t in type(err).__mro__}


def _endpoint(fs) -> str:
    endpoint = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    return f"endpoint {endpoint}" if endpoint else "the backend's default endpoint"


def _credential_hint(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or FSSPEC_S3_ANON=true for a public bucket")
    return f"give the {protocol}:// backend its credentials (its usual environment variables, or FSSPEC_{protocol.upper()}_* options)"


#: failures of the transport, not of the bytes: a read that fails with one of these (or caused by one)
#: is the network's or the credentials' fault, never evidence that the store is damaged
_TRANSPORT_ERRORS = _CONNECTION_ERRORS | _CREDENTIAL_ERRORS | {
    "PermissionError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError", "ReadTimeoutError",
    "ResponseStreamingError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError",
    "IncompleteReadError", "ProxyConnectionError",
}


def is_transport_error(err: BaseException) -> bool:
    """True when ``err`` (or an exception it was raised from) is a network/credential failure."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _names(err) & _TRANSPORT_ERRORS:
            return True
        err = err.__cause__ or err.__context__
    return False


def _protocol(url: str) -> str:
    """'s3' of 's3://bucket/x' (lower case)."""
    return url.split("://", 1)[0].lower()


def translate(url: str, err: BaseException, fs=None, *, doing: str = "read") -> UserError:
    """A one-line UserError for a failed request to the store at ``url`` (``doing``: 'read' or 'write')."""
    protocol = _protocol(url)
    names = _names(err)
    first = first_line(err, 160)
    if names & _CREDENTIAL_ERRORS:
        return UserError(f"{url}: no usable credentials for {protocol}:// ({first}); {_credential_hint(protocol)}")
    if "PermissionError" in names:
        return UserError(f"{url}: access denied ({first}); check that the credentials may {doing} this bucket, "
                         f"or {_credential_hint(protocol)}")
    if names & _CONNECTION_ERRORS:
        where = _endpoint(fs) if fs is not None else "the endpoint"
        return UserError(f"{url}: cannot reach {where} ({first}); check the network, or FSSPEC_{protocol.upper()}_ENDPOINT_URL "
                         "for an S3-compatible server")
    return UserError(f"{url}: cannot {doing} the store ({type(err).__name__}: {first}); check the URL and its storage options "
                     f"(FSSPEC_{protocol.upper()}_* environment variables)")


#: fsspec protocols that can only read (zarr cannot write a store through them)
READ_ONLY = ("http", "https")


def check_remote_output(url: str, flag: str = "--out") -> None:
    """A remote ``--out`` that cannot take a store, refused before any work (a store-writing command may
    decode every image first: hours): a read-only protocol, or what :func:`check_remote` finds (backend,
    credentials, endpoint, a missing bucket). Write permission shows only at the first write."""
    protocol = _protocol(url)
    if protocol in READ_ONLY:
        raise UserError(f"{flag} {url}: {protocol}:// stores are read-only (fsspec's HTTP filesystem cannot write); write the "
                        "store to a local path or an object store (s3://, gs://) and serve it over HTTP from there")
    check_remote(url)


def _check_byte_ranges(fs, key: str, url: str) -> None:
    """A sharded zarr array is read by byte ranges (a shard's index, then its chunks): a server that ignores
    HTTP Range requests answers with whole files, which zarr then decodes as an index, so an intact store
    reads as damaged. One 2-byte request says which kind of server this is."""
    if len(fs.cat_file(key, start=0, end=2)) > 2:
        raise UserError(f"{url}: the server ignores HTTP byte ranges (Range requests), which zarr needs to read a label store's "
                        "shards; serve it with one that honours them (nginx, caddy, an object store's HTTP endpoint; not "
                        "`python -m http.server`)")


def check_remote(url: str) -> None:
    """Fail with one line if ``url``'s filesystem cannot be used: backend not installed, no
    credentials, access denied, bucket (first path component) missing, endpoint unreachable. A
    missing store inside an existing bucket is left to the caller (it says what belongs there)."""
    if url in _checked:
        return
    import fsspec

    try:
        fs, path = fsspec.url_to_fs(url)
    except (ImportError, ValueError) as err:
        protocol = _protocol(url)
        hint = "pip install 'mealkd[remote]'" if protocol in ("s3", "s3a") else f"install the fsspec backend for {protocol}://"
        raise UserError(f"{url}: cannot open this URL with fsspec ({first_line(err, 160)}); {hint}, or use a local path") from None
    path = path.rstrip("/")
    try:
        try:
            fs.info(f"{path}/zarr.json")
            if _protocol(url) in READ_ONLY:
                _check_byte_ranges(fs, f"{path}/zarr.json", url)
        except FileNotFoundError:
            bucket = path.split("/", 1)[0]
            if bucket and bucket != path and not fs.exists(bucket):
                raise UserError(f"{url}: bucket '{bucket}' does not exist at {_endpoint(fs)}; check the URL "
                                f"(and FSSPEC_{_protocol(url).upper()}_ENDPOINT_URL for an S3-compatible server)") from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - every backend raises its own types; translate names them
        raise translate(url, err, fs) from None
    _checked.add(url)
