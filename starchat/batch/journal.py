"""Durable progress of a batch job: a manifest, an append-only results journal, atomic outputs.

Layout of the output folder:
    .starchat-batch/manifest.json   what the job is (input files with sha256, settings) and its hash
    .starchat-batch/results.jsonl   one JSON record per finished row (ok or failed), in completion order
    predictions.csv, errors.jsonl, summary.json   written from the journal by write-then-rename

Why this survives SIGKILL or power loss at any moment:
- a record is appended with one `os.write` of whole lines and fsynced every mini-batch or second;
  a row whose record did not reach the disk is generated again on resume (not lost), and one
  that did is skipped (not duplicated); duplicates cannot arise, and would be dropped (first wins);
- a torn last line (killed mid-write, or garbage after a power cut) is cut off on resume;
- output files are written to a temporary name, fsynced, then renamed over the old one, so a
  reader sees the old complete file or the new complete file, never half of one;
- the manifest is written (atomically) before the first record, so a resume always knows which
  job the records belong to and refuses a changed input or parameter set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from starchat.batch.readers import InputFile, InputPathError

JOURNAL_DIR = ".starchat-batch"
MANIFEST_VERSION = 1


class JobChangedError(ValueError):
    """The output folder holds progress of a different job (inputs or settings changed)."""


def fingerprint_inputs(files: list[InputFile]) -> list[dict]:
    """Name, size and sha256 of every input file, in job order."""
    prints = []
    for input_file in files:
        digest = hashlib.sha256()
        size = 0
        try:
            with open(input_file.path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as error:
            raise InputPathError(f"input file {str(input_file.path)!r} cannot be read ({error.strerror})") from None
        prints.append({"name": input_file.name, "bytes": size, "sha256": digest.hexdigest()})
    return prints


def job_manifest(input_prints: list[dict], settings: dict) -> dict:
    """The manifest of a job; `job_hash` covers the inputs and every setting that changes outputs."""
    canonical = json.dumps({"inputs": input_prints, "settings": settings}, sort_keys=True, separators=(",", ":"))
    return {"version": MANIFEST_VERSION, "job_hash": hashlib.sha256(canonical.encode()).hexdigest(),
            "inputs": input_prints, "settings": settings}


class AtomicFile:
    """A text file that appears at `path` complete or not at all: written under a temporary name,
    fsynced, renamed into place by `commit()`; `discard()` (or an exception) drops it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.temporary = self.path.with_name(f".{self.path.name}.tmp")
        self.handle = open(self.temporary, "w", encoding="utf-8", newline="")

    def write(self, text: str) -> None:
        self.handle.write(text)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temporary, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.handle.close()
        self.temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic = AtomicFile(path)
    try:
        atomic.write(text)
    except BaseException:
        atomic.discard()
        raise
    atomic.commit()


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Journal:
    """The results journal of one job in `output_dir`; see the module docstring."""

    def __init__(self, output_dir: Path, manifest: dict):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / JOURNAL_DIR
        self.results_path = self.folder / "results.jsonl"
        self.manifest = manifest
        self.done: set[tuple[int, int]] = set()
        self._descriptor: int | None = None
        self._last_sync = time.monotonic()
        self._unsynced = 0

    @classmethod
    def open(cls, output_dir: Path, manifest: dict, restart: bool, output_names: list[str]) -> "Journal":
        """Open (or start) the journal; refuse a changed job unless `restart`, which discards its progress."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        journal = cls(output_dir, manifest)
        manifest_path = journal.folder / "manifest.json"
        if restart:
            shutil.rmtree(journal.folder, ignore_errors=True)
            for name in output_names:
                (output_dir / name).unlink(missing_ok=True)
        # Temporaries of a write killed before its rename.
        for stale in [*output_dir.glob(".*.tmp"), *journal.folder.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
        if manifest_path.is_file() and not journal._has_results():
            manifest_path.unlink()  # a job that never finished a row (say its model failed to load): nothing to keep
        if manifest_path.is_file():
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            if old.get("job_hash") != manifest["job_hash"]:
                raise JobChangedError(f"{output_dir} holds a different job ({_describe_change(old, manifest)}); "
                                      "run with --restart to discard its progress and start over, or pick another --output")
        else:
            journal.folder.mkdir(exist_ok=True)
            journal.results_path.unlink(missing_ok=True)
            atomic_write_json(manifest_path, manifest)
        journal._recover()
        journal._descriptor = os.open(journal.results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return journal

    def _has_results(self) -> bool:
        return self.results_path.is_file() and self.results_path.stat().st_size > 0

    def _recover(self) -> None:
        """Load the keys of finished rows; cut off a torn or corrupt tail."""
        if not self.results_path.exists():
            return
        good_end = 0
        with open(self.results_path, "rb") as handle:
            for line in handle:
                record = _parse_record(line)
                if record is None:
                    break
                self.done.add(tuple(record["k"]))
                good_end += len(line)
        if good_end != self.results_path.stat().st_size:
            with open(self.results_path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, records: list[dict]) -> None:
        """Append finished rows as whole lines in one write (durable after the next sync)."""
        fresh = [r for r in records if tuple(r["k"]) not in self.done]
        if not fresh:
            return
        data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in fresh).encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._descriptor, view)
            view = view[written:]
        self.done.update(tuple(r["k"]) for r in fresh)
        self._unsynced += len(fresh)

    def sync(self) -> None:
        if self._descriptor is not None and self._unsynced:
            os.fsync(self._descriptor)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def maybe_sync(self, every_rows: int, every_seconds: float = 1.0) -> None:
        if self._unsynced >= every_rows or (self._unsynced and time.monotonic() - self._last_sync >= every_seconds):
            self.sync()

    def close(self) -> None:
        if self._descriptor is not None:
            self.sync()
            os.close(self._descriptor)
            self._descriptor = None

    def sorted_records(self) -> Iterator[dict]:
        """Every record on disk, once each, sorted by (file, row); reads them one at a time."""
        index: dict[tuple[int, int], tuple[int, int]] = {}  # key -> (offset, length)
        offset = 0
        with open(self.results_path, "rb") as handle:
            for line in handle:
                record = _parse_record(line)
                if record is None:
                    break
                index.setdefault(tuple(record["k"]), (offset, len(line)))
                offset += len(line)
            for key in sorted(index):
                start, length = index[key]
                handle.seek(start)
                yield json.loads(handle.read(length))


def _parse_record(line: bytes) -> dict | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("k"), list) and len(record["k"]) == 2 else None


def _describe_change(old: dict, new: dict) -> str:
    changes = []
    old_inputs = {item["name"]: item for item in old.get("inputs", [])}
    new_inputs = {item["name"]: item for item in new["inputs"]}
    changed = [name for name in new_inputs if name in old_inputs and old_inputs[name]["sha256"] != new_inputs[name]["sha256"]]
    added = [name for name in new_inputs if name not in old_inputs]
    removed = [name for name in old_inputs if name not in new_inputs]
    for label, names in (("input changed", changed), ("input added", added), ("input removed", removed)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            changes.append(f"{label}: {shown}")
    if not changes and [i["name"] for i in old.get("inputs", [])] != [i["name"] for i in new["inputs"]]:
        changes.append("the input files are in a different order")
    old_settings, new_settings = old.get("settings", {}), new["settings"]
    differing = sorted(k for k in set(old_settings) | set(new_settings) if old_settings.get(k) != new_settings.get(k))
    if differing:
        changes.append("settings changed: " + ", ".join(differing))
    return "; ".join(changes) or "different job hash"
