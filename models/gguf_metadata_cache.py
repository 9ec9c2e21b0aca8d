"""The config and tokenizer that transformers derives from a GGUF file's metadata, kept on disk.

transformers builds both by parsing the whole GGUF header, 49k vocabulary strings included, in
Python: about 5 s each for the embedded SmolLM2, on every worker start. Saved once as the
``config.json`` and tokenizer files ``save_pretrained`` writes, they load in a fraction of a
second. A folder is keyed by the file's path, size and modification time and by the
transformers version, so an edited file or an upgrade builds a fresh one; it is written beside
and renamed into place, so that workers starting together never read half of one. Where the
cache cannot be written, the metadata is read from the GGUF file as before.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoTokenizer

logger = logging.getLogger(__name__)

CACHE_ENV = "TANDEM_CACHE_DIR"
_COMPLETE = "complete"  # written last: a folder without it is not used


def cache_root() -> Path:
    """``$TANDEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/tandem``, else ``~/.cache/tandem``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem"


def gguf_metadata_dir(gguf_path: Path) -> Path | None:
    """A folder holding the file's config and tokenizer as transformers saves them; built on
    first use. None when it can be neither found nor written (read the GGUF file then)."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    folder = cache_root() / "gguf-metadata" / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / _COMPLETE).is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        draft = Path(tempfile.mkdtemp(prefix=".draft-", dir=folder.parent))
    except OSError as error:
        logger.info("not caching GGUF metadata (%s); reading it from %s", error, gguf_path)
        return None
    try:
        where = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name,
                 "local_files_only": True}
        AutoConfig.from_pretrained(**where).save_pretrained(draft)
        AutoTokenizer.from_pretrained(**where).save_pretrained(draft)
        (draft / _COMPLETE).write_text(key)
        draft.rename(folder)
    except OSError:  # another process renamed its folder into place first: use that one
        shutil.rmtree(draft, ignore_errors=True)
    except BaseException:
        shutil.rmtree(draft, ignore_errors=True)
        raise
    return folder if (folder / _COMPLETE).is_file() else None
