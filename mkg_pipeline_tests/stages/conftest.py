"""Helpers for the in-process stage tests: a bucket in memory, batches of corpus files, simulated kills."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from mkg_pipeline.stages.batches import IncomingObject, write_batch_manifest
from mkg_pipeline.storage import MemoryStorage, Storage
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf

#: the operations that change the bucket
WRITES = frozenset({"put", "delete", "copy"})


class Killed(BaseException):
    """The process dies here (``kill -9``): nothing after this point runs, no ``except Exception`` sees it."""


def drop(storage: Storage, files: dict[str, bytes | str], batch_id: str = "b-test") -> str:
    """Put ``files`` (name -> bytes, or the name of a corpus file) in incoming/ and batch them, as the sensor does."""
    objects = []
    for name, content in files.items():
        key = f"{storage.incoming_prefix}{name}"
        storage.put_bytes(key, content if isinstance(content, bytes) else corpus_pdf(content).read_bytes())
        head = storage.head(key)
        assert head is not None
        objects.append(IncomingObject(head.key, head.etag, head.size))
    write_batch_manifest(storage, batch_id, objects, origin="test")
    return batch_id


def kill_at_write(storage: MemoryStorage, n: int) -> None:
    """The ``n``-th write (put/delete/copy) from now on raises :class:`Killed` instead of happening."""
    counter = itertools.count(1)

    def fault(op: str, key: str) -> None:
        if op in WRITES and next(counter) == n:
            raise Killed(f"killed at write {n}: {op} {key}")

    storage.memory.fault = fault


def fail_once(storage: MemoryStorage, op: str, matches: Callable[[str], bool], error: Exception) -> list[str]:
    """The first ``op`` on a key for which ``matches`` holds raises ``error`` (an S3 hiccup); returns the keys hit."""
    hit: list[str] = []

    def fault(this_op: str, key: str) -> None:
        if this_op == op and matches(key) and not hit:
            hit.append(key)
            raise error

    storage.memory.fault = fault
    return hit


def record_ops(storage: MemoryStorage) -> list[tuple[str, str]]:
    """Every operation from now on, as (op, key)."""
    seen: list[tuple[str, str]] = []
    storage.memory.fault = lambda op, key: seen.append((op, key))
    return seen
