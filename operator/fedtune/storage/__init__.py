"""Object storage over URLs: file://, memory:// and s3://."""

from fedtune.storage.base import ObjectNotFound, ObjectStore, ObjectTooLarge, StorageError, join
from fedtune.storage.urls import open_object, open_store

__all__ = ["ObjectNotFound", "ObjectStore", "ObjectTooLarge", "StorageError", "join", "open_object", "open_store"]
