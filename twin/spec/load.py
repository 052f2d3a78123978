"""Load a site: read YAML files, validate every document, return the normalised spec set.

``load_site(paths)`` reads files and folders (recursively, ``*.yaml``/``*.yml``, in sorted
order), validates each document against its kind's JSON Schema, checks references across
documents, and raises ``SpecError`` with **every** problem found, each located as
``file:line:col``. Nothing is returned half-valid.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import marshal
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from twin.errors import Location, Problem, SpecError
from twin.spec.documents import Document, LoadedSpecs
from twin.spec.gcpause import gc_paused
from twin.spec.inputlimits import value_problems
from twin.spec.plugins import embed_modules
from twin.spec.refs import reference_problems, split_follow_ons
from twin.spec.schema import known_kinds, schema_problems
from twin.spec.yamlload import YamlDocument, load_documents

API_VERSION = "flux.iot/v1"

def find_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            ignore = _ignore_patterns(path)
            found = sorted(
                f for f in path.rglob("*")
                if f.suffix in (".yaml", ".yml") and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
                and not _ignored(f.relative_to(path).as_posix(), ignore)
            )
            if not found:
                problems.append(Problem(Location(str(path), 1, 1), "no *.yaml files in this folder"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(Location(str(path), 1, 1), "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique, problems


def _ignore_patterns(folder: Path) -> list[str]:
    """``.twinignore`` in a site folder: one glob per line (``#`` comments), matched against
    paths relative to the folder; a pattern ending in ``/`` ignores a whole subfolder. For YAML
    that is not a spec, such as `twin simulate` scenarios."""
    try:
        lines = (folder / ".twinignore").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat.endswith("/"):
            if rel.startswith(pat) or fnmatch.fnmatch(rel.split("/", 1)[0] + "/", pat):
                return True
        elif fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pat):
            return True
    return False


def normalise(body: dict[str, Any]) -> dict[str, Any]:
    """Shorthands expanded (``binding: http`` → ``binding: {http: {}}``), nulls dropped."""
    spec = body.get("spec")
    if isinstance(spec, dict):
        binding = spec.get("binding")
        if isinstance(binding, str):
            spec["binding"] = {binding: {}}
        elif isinstance(binding, dict):
            for proto, opts in list(binding.items()):
                if opts is None:
                    binding[proto] = {}
    meta = body.get("metadata")
    if isinstance(meta, dict):
        for k in ("tags", "labels"):
            if meta.get(k) is None:
                meta.pop(k, None)
    return body


def load_site(
    paths: Iterable[str | Path] | str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    strict: bool = True,
    cache_dir: str | Path | None = None,
) -> LoadedSpecs:
    """Load and validate. Raises SpecError with every problem (when ``strict``).

    With ``cache_dir``, files whose exact content was parsed and schema-checked before are
    not parsed again (references are always checked anew); see ``ParseCache``.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    cache = ParseCache(Path(cache_dir)) if cache_dir is not None else None
    with gc_paused():
        return _load_site(paths, progress, strict, cache)


class ParseCache:
    """Parsed, schema-valid documents per file content, so an unchanged file is not re-parsed.

    Keyed by sha256 of (cache format, every JSON Schema, the file's bytes); an entry holds
    the documents' plain data (marshal). Only files without any problem are cached, and a
    cached document that a reference check flags is parsed again for its locations. Entries
    are written atomically; a corrupt or unreadable entry is a miss.
    """

    VERSION = b"twin-parse-cache-1"

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    @cache
    def _schemas_digest() -> bytes:
        from twin.spec.schema import specs_dir

        h = hashlib.sha256()
        for p in sorted(specs_dir().glob("*.json")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        return h.digest()

    def key(self, raw: bytes) -> str:
        return hashlib.sha256(self.VERSION + self._schemas_digest() + raw).hexdigest()

    def get(self, key: str) -> list[tuple[int, Any]] | None:
        try:
            value = marshal.loads((self.root / key).read_bytes())
        except (OSError, ValueError, EOFError, TypeError):
            return None
        return value if isinstance(value, list) else None

    def put(self, key: str, docs: list[tuple[int, Any]]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{key}.{os.getpid()}.tmp"
            tmp.write_bytes(marshal.dumps(docs))
            os.replace(tmp, self.root / key)
        except (OSError, ValueError):
            pass  # a cache that cannot be written is only slower


def _load_site(
    paths: Iterable[str | Path],
    progress: Callable[[int, int], None] | None,
    strict: bool,
    cache: ParseCache | None,
) -> LoadedSpecs:
    files, problems = find_files(paths)
    loaded = LoadedSpecs(files=[str(f) for f in files])
    kinds = known_kinds()
    broken: list[str] = []  # the text of each file that could not be parsed
    for i, f in enumerate(files):
        try:
            raw = f.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(Location(str(f), 1, 1), f"cannot read file: {exc}", syntax=True))
            if isinstance(exc, UnicodeDecodeError):
                broken.append(raw.decode("utf-8", errors="replace"))
            continue
        key = cache.key(raw) if cache is not None else ""
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            for index, data in cached:
                _take(YamlDocument(data, str(f), index, lazy=True), kinds, loaded, problems)
        else:
            docs, yaml_problems = load_documents(text, str(f))
            problems.extend(yaml_problems)
            if any(p.syntax for p in yaml_problems):
                broken.append(text)
            before = len(problems)
            for doc in docs:
                _take(doc, kinds, loaded, problems)
            if cache is not None and not yaml_problems and len(problems) == before:
                cache.put(key, [(d.index, d.data) for d in docs])
        if progress is not None:
            progress(i + 1, len(files))
    problems.extend(embed_modules(loaded))  # module files of Plugin documents, read and hashed
    follow_ons, suppressed = split_follow_ons(reference_problems(loaded), broken)
    problems.extend(follow_ons)
    if problems and strict:
        hint = "fix the problems above and run `twin validate` again"
        if suppressed:
            hint = ("fix the syntax errors first and run `twin validate` again: the suppressed "
                    "problems are most likely references to documents in the files that could "
                    "not be parsed")
        raise SpecError(problems, hint=hint, suppressed=suppressed)
    return loaded


def _path_text(path: Sequence[str | int]) -> str:
    from twin.spec.paths import format_path

    return format_path(path)


def validate_specs(documents: Iterable[Mapping[str, Any]], *, strict: bool = True) -> LoadedSpecs:
    """Validate documents that come from memory (an API write): the same schema and reference
    checks as files; problems name the kind, name and path inside the document."""
    import copy

    kinds = known_kinds()
    loaded = LoadedSpecs()
    problems: list[Problem] = []
    with gc_paused():
        for i, body in enumerate(documents):
            doc = YamlDocument(copy.deepcopy(dict(body)), "", i, in_memory=True)
            _take(doc, kinds, loaded, problems)
        problems.extend(reference_problems(loaded))
    if problems and strict:
        raise SpecError(problems)
    return loaded


def _take(doc: YamlDocument, kinds: list[str], loaded: LoadedSpecs, problems: list[Problem]) -> None:
    data = doc.data
    if not isinstance(data, dict):
        problems.append(Problem(doc.where(()), "a document must be a mapping with apiVersion, kind, "
                                "metadata and spec"))
        return
    kind = data.get("kind")
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    name = name if isinstance(name, str) else None
    if not isinstance(kind, str):
        problems.append(Problem(doc.where(("kind",)) if "kind" in data else doc.where(()),
                                "missing or invalid 'kind'",
                                hint="every document names its kind, e.g. kind: Device "
                                "(`twin validate --help` lists the kinds)"))
        return
    if kind not in kinds:
        close = difflib.get_close_matches(kind, kinds, n=1)
        problems.append(Problem(doc.where(("kind",)), f"unknown kind {kind!r}", kind=None,
                                hint=f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(kinds)}"))
        return
    if data.get("apiVersion") != API_VERSION:
        # reported by the schema too, but say it once, clearly, and keep going
        pass
    body = normalise(data)  # the data was built fresh for this document: normalised in place
    # NaN/Infinity, lone surrogates, deep nesting: files were checked as they were parsed
    # (YAML cannot hold a lone surrogate; the builder bounds nesting), documents from memory
    # are walked here
    found = value_problems(body) if doc.in_memory else doc.bad_values
    errs = [Problem(doc.where(path), message, kind, name, _path_text(path) or None)
            for path, message in found]
    if not errs:  # NaN, lone surrogates, deep nesting: the schema validator is not fed them
        errs = schema_problems(doc, kind, name)
    if errs:
        problems.extend(errs)
        if name is None:
            return
    if name is None:
        return
    key = (kind, name)
    if key in loaded.documents:
        first = loaded.documents[key]
        problems.append(Problem(doc.where(("metadata", "name")), f"duplicate {kind} name {name!r}",
                                kind, name, "metadata.name",
                                hint=f"first defined at {first.location}" if first.location else None))
        return
    loaded.documents[key] = Document(kind, name, body, doc)
    if errs:
        loaded.invalid.add(key)
