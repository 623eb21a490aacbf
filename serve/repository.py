"""The served model repository: what is on disk under exported/, which versions are READY, load/unload.

At start every <name>/<version>/ is scanned and verified (`scan_repository(verify=True)`: manifest
schema, file hashes), then every served graph of every healthy version is opened with the runner factory
(onnxruntime sessions, see serve.session), and the `prepare` hook makes the version warm (the runtime builds a
denoising model's iteration graph and runs every graph once, as Triton's model_warmup does). A version is READY
only when all of that worked, else UNAVAILABLE with the reason (bad manifest, hash mismatch, onnxruntime refusing
the file, a denoiser the iteration graph cannot be built around, ...). Graphs a family keeps only for older
exports (the legacy diffusion `step`) are verified but neither opened nor served.

`load(name)` re-reads one model from disk: versions whose manifest and files are unchanged keep their
open sessions, new or changed ones are opened, and only then is the model's version table replaced in
one assignment, so requests keep being served by the old versions until the new ones are ready.
`unload(name)` drops the sessions; the model stays listed, UNAVAILABLE ("unloaded"), until loaded again.

Model names are checked against serve.manifest.NAME_RE before anything touches the filesystem.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.errors import InvalidArgument, NotFound, Unavailable
from serve.manifest import NAME_RE, GraphInfo, Manifest, VersionEntry, scan_repository, verify_files

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"

# (version folder, graph info) -> an object with .run(feeds) -> outputs; raising means "cannot serve"
RunnerFactory = Callable[[Path, GraphInfo], Any]
# a version whose graphs are open -> what else it is served with (kept in ModelVersion.extras); raising means
# "cannot serve"
Preparer = Callable[["ModelVersion"], dict]


@dataclass(eq=False)  # identity semantics: the runtime keys its batchers on the object
class ModelVersion:
    name: str
    version: int  # -1 for a folder that is not a version number
    path: Path
    manifest: Manifest | None
    state: str
    reason: str = ""
    runners: dict[str, Any] = field(default_factory=dict, repr=False)  # graph name -> runner
    extras: dict[str, Any] = field(default_factory=dict, repr=False)  # from the preparer, e.g. a denoising session

    @property
    def ready(self) -> bool:
        return self.state == READY


@dataclass(frozen=True)
class IndexEntry:
    """One row of Triton's RepositoryIndex."""

    name: str
    version: str
    state: str
    reason: str


def check_name(name: str, field_name: str = "model") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # fullmatch: "$" would allow a final "\n"
        raise InvalidArgument(f"{field_name}: {name!r} is not a model name "
                              f"(lower-case letters, digits, '.', '_', '-'; pattern {NAME_RE.pattern})")
    return name


def _default_factory(version_dir: Path, graph: GraphInfo) -> Any:
    from serve.session import GraphRunner

    return GraphRunner(version_dir, graph, device="cpu")


class Repository:
    """The models under `root` and their versions; see the module docstring."""

    def __init__(self, root: str | Path, runner_factory: RunnerFactory | None = None,
                 prepare: Preparer | None = None):
        self.root = Path(root)
        self._factory = runner_factory or _default_factory
        self._prepare = prepare
        self._lock = threading.Lock()  # one load/unload at a time; readers never lock
        self._models: dict[str, dict[str, ModelVersion]] = {}  # name -> version folder name -> version
        models: dict[str, dict[str, ModelVersion]] = {}
        for entry in scan_repository(self.root, verify=True):
            models.setdefault(entry.name, {})[entry.path.name] = self._open(entry, None)
        self._models = models

    # --- reading -----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[ModelVersion]:
        return sorted(self._models.get(name, {}).values(), key=lambda v: (v.version, v.path.name))

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every (name, version) with its state and reason, sorted, for RepositoryIndex."""
        rows = []
        for name in sorted(self._models):
            for mv in self.versions(name):
                if ready_only and not mv.ready:
                    continue
                version = str(mv.version) if mv.version >= 0 else mv.path.name
                rows.append(IndexEntry(name, version, mv.state, mv.reason))
        return rows

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """The highest READY version of `name`, or the given version if it is READY."""
        check_name(name)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise InvalidArgument(f"version: expected a positive integer, got {version!r}")
        table = self._models.get(name)  # one read: a concurrent load swaps the whole table
        if table is None:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"model {name!r} is not in the repository (models: {known})")
        if version is not None:
            mv = table.get(str(version))
            if mv is None:
                have = ", ".join(str(v.version) for v in self.versions(name) if v.version >= 1) or "none"
                raise NotFound(f"model {name!r} has no version {version} (versions: {have})")
            if not mv.ready:
                raise Unavailable(f"model {name!r} version {version} is unavailable: {mv.reason}")
            return mv
        ready = [mv for mv in table.values() if mv.ready]
        if not ready:
            reasons = "; ".join(f"version {mv.path.name}: {mv.reason}" for mv in self.versions(name))
            raise Unavailable(f"model {name!r} has no ready version ({reasons})")
        return max(ready, key=lambda mv: mv.version)

    # --- loading -----------------------------------------------------------------------------------

    def load(self, name: str) -> list[ModelVersion]:
        """(Re)load one model from disk; returns the versions that stopped being served (for cleanup).

        Raises NotFound when the model has no folder (it is then dropped from the index).
        """
        check_name(name)
        with self._lock:
            old = self._models.get(name, {})
            if not (self.root / name).is_dir():
                if name in self._models:
                    self._models = {k: v for k, v in self._models.items() if k != name}
                raise NotFound(f"model {name!r}: no folder {self.root / name}")
            # scanning without verify only reads manifests; only this model's files are hashed below
            entries = [e for e in scan_repository(self.root, verify=False) if e.name == name]
            table = {}
            for entry in entries:
                if entry.manifest is not None and not entry.problems:
                    entry.problems = verify_files(entry.path, entry.manifest)
                table[entry.path.name] = self._open(entry, old.get(entry.path.name))
            self._models = {**self._models, name: table}  # the atomic swap
            return [mv for key, mv in old.items() if mv.ready and table.get(key) is not mv]

    def unload(self, name: str) -> list[ModelVersion]:
        """Stop serving every version of `name`; returns the versions that stopped being served."""
        check_name(name)
        with self._lock:
            old = self._models.get(name)
            if old is None:
                raise NotFound(f"model {name!r} is not in the repository")
            table = {key: ModelVersion(mv.name, mv.version, mv.path, mv.manifest, UNAVAILABLE, "unloaded")
                     for key, mv in old.items()}
            self._models = {**self._models, name: table}
            return [mv for mv in old.values() if mv.ready]

    def _open(self, entry: VersionEntry, previous: ModelVersion | None) -> ModelVersion:
        if not entry.healthy:
            return ModelVersion(entry.name, entry.version, entry.path, entry.manifest, UNAVAILABLE,
                                "; ".join(entry.problems))
        if previous is not None and previous.ready and previous.manifest is not None \
                and previous.manifest.raw == entry.manifest.raw:
            return previous  # unchanged on disk (the manifest pins every file's hash): keep its sessions
        runners = {}
        for graph in entry.manifest.served_graphs.values():
            try:
                runners[graph.name] = self._factory(entry.path, graph)
            except Exception as e:  # noqa: BLE001 - any failure makes the version unavailable, with its reason
                return self._unavailable(entry, f"{graph.file}: cannot be served: {_first_line(e)}")
        mv = ModelVersion(entry.name, entry.version, entry.path, entry.manifest, READY, "", runners)
        if self._prepare is not None:
            try:
                mv.extras = self._prepare(mv)
            except Exception as e:  # noqa: BLE001 - a version that cannot be made warm is not served
                return self._unavailable(entry, f"cannot be served: {_first_line(e)}")
        return mv

    @staticmethod
    def _unavailable(entry: VersionEntry, reason: str) -> ModelVersion:
        log.warning("%s/%s: %s", entry.name, entry.version, reason)
        return ModelVersion(entry.name, entry.version, entry.path, entry.manifest, UNAVAILABLE, reason)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
