"""Storage backends behind one interface, chosen by URL scheme; drivers are imported lazily."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from .base import Decision, Charge, HoldRequest, RowRefused, Store, StoreUnavailable

__all__ = ["Decision", "Charge", "HoldRequest", "RowRefused", "Store", "StoreUnavailable", "open_store", "mask_url",
           "StoreConfigError", "url_scheme"]


class StoreConfigError(ValueError):
    """A storage URL that names no usable backend or cannot be opened."""


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def sqlite_path(url: str) -> str:
    """sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db, sqlite:///:memory: -> :memory:."""
    if not url.startswith("sqlite:///"):
        raise StoreConfigError(f"storage URL {mask_url(url)} must look like sqlite:///path.db")
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path:
        raise StoreConfigError(f"storage URL {mask_url(url)} names no file")
    return path


def url_scheme(url: str) -> str:
    """The storage URL's scheme, lower-case: it picks the backend."""
    return url.split(":", 1)[0].lower()


def make_store(url: str, pool_min: int = 1, pool_max: int = 10) -> Store:
    """Build (without connecting) the backend for a storage URL."""
    scheme = url_scheme(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url, pool_min=pool_min, pool_max=pool_max)
    raise StoreConfigError(f"storage URL {mask_url(url)} must start with sqlite:/// or postgresql://")


async def open_store(url: str, pool_min: int = 1, pool_max: int = 10) -> Store:
    """Connect to the store named by url and make sure its schema is current."""
    store = make_store(url, pool_min, pool_max)
    try:
        await store.setup()
    except StoreConfigError:
        raise
    except Exception as e:  # driver errors vary by backend: report them in one line
        try:
            await store.close()
        except Exception:
            pass
        raise StoreConfigError(f"cannot open storage {mask_url(url)}: {one_line(e, url)}") from e
    return store


def one_line(error: BaseException, url: str) -> str:
    """`Type: message` on one line, with the URL's password (if any) masked."""
    text = " ".join(str(error).split()) or "no answer in time"
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return f"{type(error).__name__}: {text}"
