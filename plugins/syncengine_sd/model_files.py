"""Which file of a model is broken: truncated or garbage weights, a missing weight file, bad JSON, unknown components.

diffusers, transformers, safetensors and torch report a damaged model in many ways (an ``OSError`` naming the file, a
``SafetensorError`` naming none, a ``JSONDecodeError``, a ``TypeError`` from a ``model_index.json`` that is a list).
After a load fails, the loaders here look at the files themselves (headers and JSON only, no tensors) and say which
file is broken and how; a failure that no file explains keeps its cause. Shared by the base-model, ControlNet,
MVDiffusion and backbone loaders.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from syncengine.errors import ModelNotFoundError, SyncEngineError, one_line

T = TypeVar("T")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors refuses larger headers
CRC_CHECK_LIMIT = 1 << 30  # zip checkpoints up to this size also get their checksums verified (reads the whole file)
# torch.save's legacy (pre-zip) format: a pickled magic number after the protocol opcode
_LEGACY_MAGIC = bytes.fromhex("8a0a6cfc9c46f9206aa85019")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a damaged or unreadable model raises, beyond bugs: these become one-line errors even when no file is
    found to blame (with the cause in the message)."""
    errors: list[type[BaseException]] = [OSError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


LOAD_ERRORS = _load_errors()


# ----------------------------------------------------------------------------------------------------- one file


def file_problem(path: str | Path) -> Optional[str]:
    """Why ``path`` is not a readable checkpoint (safetensors, PyTorch zip or legacy pickle), as a phrase that follows
    the file's name ("is truncated: ..."); None when its structure is sound. Reads headers, not tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return f"cannot be read ({one_line(exc, 120)})"
    if size == 0:
        return "is empty (0 bytes)"
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        return _safetensors_problem(path, size)
    if head[:2] == b"PK":
        return _zip_problem(path)
    if head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC:
        return None  # legacy torch.save format: no structure to check without unpickling
    return "is not a checkpoint (neither a safetensors file nor a PyTorch file: unrecognised bytes)"


def _safetensors_problem(path: Path, size: int) -> Optional[str]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"is truncated ({size} bytes: not even a safetensors header)"
        n = int.from_bytes(raw, "little")
        if n > SAFETENSORS_HEADER_LIMIT:
            return "is not a safetensors file (garbage where its header should be)"
        header = f.read(min(n, max(size - 8, 0)))
    if not header.startswith(b"{"):
        return "is not a safetensors file (garbage where its header should be)"
    if n > size - 8:
        return f"is truncated ({size} bytes, cut inside its {n}-byte header)"
    try:
        meta = json.loads(header.decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is not a safetensors file (its header is not valid safetensors JSON)"
    expected = 8 + n + end
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"is corrupt ({size - expected} bytes beyond its last tensor; expected {expected} bytes)"
    return None


def _zip_problem(path: Path) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not any(name.endswith("data.pkl") for name in names):
                return "is a zip archive but not a PyTorch checkpoint (no data.pkl)"
            # CRCs find damage inside the archive too, but read all of it: only for files of backbone size
            bad = z.testzip() if path.stat().st_size <= CRC_CHECK_LIMIT else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"is truncated or corrupt (not a complete zip archive: {one_line(exc, 80)})"
    if bad is not None:
        return f"is corrupt (its member {bad} fails its checksum)"
    return None


# ------------------------------------------------------------------------------------------------------ folders


def _json_problem(path: Path) -> tuple[Any, Optional[str]]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"is not valid JSON ({one_line(exc, 80)})"
    except OSError as exc:
        return None, f"cannot be read ({one_line(exc, 80)})"


def model_folder_problem(folder: Path) -> Optional[tuple[Path, str]]:
    """The first broken file of one model's folder (``config.json`` + weights, a scheduler's or tokenizer's JSON)."""
    for json_file in sorted(folder.glob("*.json")):
        data, problem = _json_problem(json_file)
        if problem:
            return json_file, problem
        if json_file.name.endswith(".index.json") and isinstance(data, dict):  # sharded weights
            for shard in sorted(set((data.get("weight_map") or {}).values())):
                if not (folder / shard).is_file():
                    return folder / shard, f"is missing (listed in {json_file.name})"
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    config = folder / "config.json"
    if config.is_file() and not weights:
        data, _ = _json_problem(config)
        name = "diffusion_pytorch_model.safetensors" if isinstance(data, dict) and "_diffusers_version" in data \
            else "model.safetensors"
        return folder / name, "is missing (the folder has config.json but no weight file)"
    for weight in weights:
        if not weight.is_file():
            return weight, "is missing (a broken link)"
        problem = file_problem(weight)
        if problem:
            return weight, problem
    return None


def _known_component(library: str, class_name: str) -> bool:
    try:
        if library in ("diffusers", "transformers"):
            return hasattr(importlib.import_module(library), class_name)
        import diffusers.pipelines

        if hasattr(diffusers.pipelines, library):  # e.g. ["stable_diffusion", "StableDiffusionSafetyChecker"]
            return True
        return importlib.util.find_spec(library) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _required_components(pipeline_cls) -> set[str]:
    try:
        expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
        return set(expected) - set(getattr(pipeline_cls, "_optional_components", []) or [])
    except Exception:  # noqa: BLE001 - a diffusers internal; without it this check is skipped
        return set()


def pipeline_folder_problem(folder: Path, pipeline_cls=None) -> Optional[tuple[Path, str]]:
    """The first broken file of a diffusers pipeline folder: ``model_index.json`` (JSON, known components, the
    pipeline's required ones), then each component's folder."""
    index_file = folder / "model_index.json"
    index, problem = _json_problem(index_file)
    if problem:
        return index_file, problem
    if not isinstance(index, dict):
        return index_file, "is not a JSON object mapping components to [library, class]"
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)):
            continue  # diffusers metadata and pipeline options (requires_safety_checker: false)
        if len(entry) != 2:
            return index_file, f"gives component {name!r} as {entry!r}, not [library, class]"
        library, class_name = entry
        if library is None or class_name is None:
            continue
        if not _known_component(str(library), str(class_name)):
            return index_file, (f"names an unknown component {name!r}: [{library!r}, {class_name!r}] is no "
                                "installed class")
        components[name] = folder / name
    missing = sorted(_required_components(pipeline_cls) - set(components)) if pipeline_cls is not None else []
    if missing:
        return index_file, (f"lists no {', '.join(missing)} component, which {pipeline_cls.__name__} needs")
    for name, sub in components.items():
        if not sub.is_dir():
            return sub, f"is missing (model_index.json lists component {name!r})"
        found = model_folder_problem(sub)
        if found:
            return found
    return None


def broken_file(path: str | Path, pipeline_cls=None) -> Optional[tuple[Path, str]]:
    """``(file, what is wrong)`` for the first broken file of a checkpoint file, a pipeline folder (with
    ``model_index.json``) or one model's folder; None when every file looks sound."""
    path = Path(path)
    if path.is_file():
        problem = file_problem(path)
        return (path, problem) if problem else None
    if not path.is_dir():
        return None
    if (path / "model_index.json").exists():
        return pipeline_folder_problem(path, pipeline_cls)
    return model_folder_problem(path)


# ------------------------------------------------------------------------------------------------------ loading


def explain_failure(exc: BaseException, path: str | Path, what: str, fix: str,
                    pipeline_cls=None) -> Optional[SyncEngineError]:
    """The one-line error for a failed load of ``path`` (``what`` names it for the user, ``fix`` says what to do):
    the broken file when one is found, else the cause when it is a loading error; None for anything else (a bug,
    which keeps its traceback)."""
    if isinstance(exc, SyncEngineError):
        return exc
    found = broken_file(path, pipeline_cls)
    if found is not None:
        file, problem = found
        return ModelNotFoundError(f"{what} is damaged: {str(file)!r} {problem}; {fix}")
    if isinstance(exc, LOAD_ERRORS):
        return ModelNotFoundError(f"{what} could not be loaded ({one_line(exc)}); {fix}")
    return None


def load_checked(load: Callable[[], T], path: str | Path, what: str, fix: str, pipeline_cls=None) -> T:
    """``load()`` (which reads ``path``); a failure becomes :func:`explain_failure`'s one-line error."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - narrowed by explain_failure; others are re-raised
        error = explain_failure(exc, path, what, fix, pipeline_cls)
        if error is None or error is exc:
            raise
        raise error from exc


def _chain(exc: Optional[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _hub_repo(exc: BaseException) -> Optional[str]:
    """When diffusers failed fetching from the Hugging Face hub (anywhere in ``exc``'s chain): the repo it wanted
    (``""`` when no message names it); None when the hub was not involved."""
    import re

    chain = _chain(exc)
    if not any(type(e).__module__.startswith("huggingface_hub") for e in chain):
        return None
    for e in chain:
        found = re.search(r"huggingface\.co/(?:api/models/)?([\w.-]+/[\w.-]+)/", str(e))
        if found:
            return found.group(1)
    return ""


def load_single_file(load: Callable[[], T], path: str | Path, what: str, config: Optional[str],
                     config_key: str, config_hint: str) -> T:
    """``load()`` of one single-file checkpoint (``from_single_file``). A file that is not a valid, complete
    checkpoint says so; one that loads but whose architecture's configs diffusers cannot fetch (offline) needs
    ``config_key`` (``config_hint``: what to set it to); one that lacks weights the architecture needs says that."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - classified below; others are re-raised
        if isinstance(exc, SyncEngineError):
            raise
        problem = file_problem(Path(path))
        if problem:
            raise ModelNotFoundError(
                f"{what} is not a valid, complete checkpoint: it {problem}; download it again (or save the model "
                f"with save_pretrained and load that folder)") from exc
        if type(exc).__name__ == "SingleFileComponentError":
            where = f"the architecture of {config_key} {config!r}" if config else "the architecture diffusers inferred"
            raise ModelNotFoundError(
                f"{what} does not hold the weights {where} needs ({one_line(exc)}); check that it is a checkpoint of "
                f"that model (set {config_key} to {config_hint} of the same architecture)") from exc
        repo = _hub_repo(exc)
        if config is None and repo is not None:
            # the checkpoint loaded; diffusers inferred an architecture and could not fetch its configs
            guess = f" (diffusers took it for {repo}, which is not cached)" if repo else ""
            raise ModelNotFoundError(
                f"{what} loaded, but its pipeline's configs could not be fetched{guess}: it needs them locally; set "
                f"{config_key} to {config_hint} of the same architecture (or a cached hub id)") from exc
        if isinstance(exc, LOAD_ERRORS):
            hint = (f"check that {config_key} {config!r} has its architecture" if config else
                    f"check the file (download it again), or set {config_key} to {config_hint} of its architecture")
            raise ModelNotFoundError(f"{what} could not be loaded ({one_line(exc)}); {hint}") from exc
        raise


def cached_snapshot(repo_id: str, revision: Optional[str] = None) -> Optional[Path]:
    """The local folder of a hub model in the Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a repo id, offline: nothing to inspect
        return None


def damaged_cache_error(exc: BaseException, repo_id: str, what: str,
                        revision: Optional[str] = None, pipeline_cls=None) -> Optional[SyncEngineError]:
    """For a hub id that failed to load: the broken file of its cached snapshot, if that is the cause."""
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is None:
        return None
    found = broken_file(snapshot, pipeline_cls)
    if found is None:
        return None
    file, problem = found
    return ModelNotFoundError(
        f"{what} {repo_id!r} in the Hugging Face cache is damaged: {str(file)!r} {problem}; delete it and download "
        f"the model again (`huggingface-cli download {repo_id} --force-download`)")
