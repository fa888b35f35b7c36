"""Object storage (s3://, gs://...) for prepared data, checkpoints and MLflow artifacts: check a bucket before a job
writes to it or reads from it, and turn pyarrow's object-store errors into one line naming the bucket and the fix.

On a cluster of machines there is no shared folder: every node reads the prepared data and writes checkpoints
through pyarrow's filesystems (the ones Ray Data and Ray Train use). The endpoint and credentials come from the
standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`)
and config files, as pyarrow reads them; nothing here takes a credential, and no message carries one.

    python -m inpaint.storage check s3://BUCKET/PREFIX     # one line and exit 2 if the bucket is not usable
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from inpaint.errors import UserError

# What the AWS SDK (under pyarrow's S3 filesystem) names its errors, grouped by the fix each needs.
UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|curlCode: (6|7|28|35|52|56)|Could not (connect|resolve)|Timeout was reached|"
    r"REQUEST_TIMEOUT|Connection (refused|reset)",
    re.IGNORECASE,
)
DENIED = re.compile(
    r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|InvalidAccessKeyId|SignatureDoesNotMatch|"
    r"MISSING_AUTHENTICATION_TOKEN|EXPIRED_TOKEN|UNRECOGNIZED_CLIENT|HTTP response code: 403|Forbidden|"
    r"No response body",  # a refused HEAD request has no body to say more
)
NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist", re.IGNORECASE)
CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile in ~/.aws)"

# How long S3 requests may take. On Linux the AWS SDK hands request_timeout to curl as a stall limit: a request is
# cut once under 1 byte/s has moved for that long, however long the whole transfer takes, so a big checkpoint that
# keeps moving is never cut. As `FileSystem.from_uri` leaves them (a 3 s stall, and a connection error, which a stall
# is, retried every 0.2 s for 6 s), an endpoint that accepts connections but never answers took 100 s to report.
# The pre-flight check asks one HEAD, which a usable store answers at once: 3 s stalls, 2 attempts, about 7 s in all.
CHECK_TIMEOUTS = {
    "connect_timeout": 3,
    "request_timeout": 3,
    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
}


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (or any pyarrow URI) rather than a local folder."""
    return "://" in str(path)


def endpoint(uri: str) -> str:
    """Where a URI's requests go, for messages: the S3 endpoint the AWS variables name, else the scheme's default."""
    scheme = urlsplit(uri).scheme
    if scheme == "s3":
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    return f"{scheme}://"


def bucket(uri: str) -> str:
    """The bucket of `s3://BUCKET/PREFIX` (the host part of any URI)."""
    return urlsplit(uri).hostname or ""


def filesystem(uri: str | os.PathLike, timeouts: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a URI (s3://, gs://, file://...); a plain path is local. An S3 one is
    what `FileSystem.from_uri` makes of the URI and the AWS settings, with `timeouts` if given (CHECK_TIMEOUTS).

    Credentials in the URI (`s3://KEY:SECRET@bucket`) are refused: they would reach logs and MLflow params."""
    uri = str(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise UserError(
            f"{parts.scheme}://...@{parts.hostname}{parts.path} carries credentials in the URI, where logs and "
            f"MLflow would show them: give them as {CREDENTIALS} instead"
        )
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except OSError as err:  # S3 resolves the bucket's region here: the endpoint is already asked
        raise explain(err, uri, "opening it") from None
    except pa.ArrowException as err:
        raise UserError(f"cannot open {uri} ({err}); pass a local path or a URI pyarrow supports") from None
    if timeouts and isinstance(fs, pafs.S3FileSystem):
        # every option from_uri resolved (endpoint, region, credentials chain...), as pickling copies them
        options = fs.__reduce__()[1][0]
        fs = pafs.S3FileSystem(**options | timeouts)
    return fs, path.rstrip("/")


def explain(err: OSError, uri: str, doing: str) -> UserError:
    """One line for an object-store error: what failed on which bucket, and the fix."""
    text = str(err)
    name, where = bucket(uri), endpoint(uri)
    if UNREACHABLE.search(text):
        fix = "start it, or point AWS_ENDPOINT_URL at a reachable one" if "://" in where else "check the network"
        return UserError(f"cannot reach the object store at {where} for bucket {name!r} while {doing}: {fix}")
    if NO_BUCKET.search(text):
        return missing_bucket(uri)
    if DENIED.search(text):
        return UserError(
            f"the object store at {where} refused access to bucket {name!r} while {doing}: "
            f"check {CREDENTIALS} and the bucket's policy"
        )
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    return UserError(f"object store error on bucket {name!r} at {where} while {doing} ({first[:300]}): check {uri}")


def check_bucket(uri: str | os.PathLike, doing: str) -> None:
    """Refuse, before any work, a URI whose bucket is unreachable, missing or closed to these credentials,
    so that a job fails in one line instead of halfway through writing. A local path passes."""
    uri = str(uri)
    if not is_uri(uri) or uri.startswith("file://"):
        return
    fs, path = filesystem(uri, CHECK_TIMEOUTS)
    try:
        info = fs.get_file_info(path.split("/")[0])
    except OSError as err:
        raise explain(err, uri, doing) from None
    if info.type == pafs.FileType.NotFound:
        raise missing_bucket(uri)


def missing_bucket(uri: str) -> UserError:
    name = bucket(uri)
    return UserError(
        f"bucket {name!r} does not exist at {endpoint(uri)}: create it (e.g. aws s3 mb s3://{name}) or fix {uri}"
    )


@contextlib.contextmanager
def errors_explained(uri: str | os.PathLike, doing: str) -> Iterator[None]:
    """Inside: an object-store error on `uri` becomes `explain`'s one line (a local path's errors pass as they are)."""
    try:
        yield
    except OSError as err:
        if not is_uri(uri):
            raise
        raise explain(err, str(uri), doing) from None


def main(argv: list[str] | None = None) -> int:
    """`check URI`: what deploy/mlflow-server.sh asks before it serves artifacts from an object store."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "check":
        print("usage: python -m inpaint.storage check URI", file=sys.stderr)
        return 2
    try:
        check_bucket(args[1], "checking it")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
