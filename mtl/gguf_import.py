"""GGUF files in: ``--init model.gguf`` becomes a Hugging Face model folder once, then imports as one.

GGUF (llama.cpp's format) is how most small models travel, often quantised.
``transformers`` reads it (``from_pretrained(..., gguf_file=...)``): it maps
llama.cpp's tensor names back to its own, undoes llama.cpp's rotary layout of
the query and key rows, dequantises every tensor to f32 and builds the
tokenizer (chat template included) from the file's metadata. mtl saves that
model and tokenizer as a folder in its cache (``gguf/`` under
:func:`mtl.cache_dir.root`: ``$MTL_CACHE_DIR``, default ``~/.cache/mtl``),
keyed by the file's path, size and modification time, and imports the folder
as any other (:mod:`mtl.hf_import`), so a resumed run finds it again without
converting twice.

Before anything is converted, the file's architecture and every tensor's type
are checked: an architecture mtl's backbone does not carry or a quantisation
type outside :data:`TYPES` is one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

from mtl import cache_dir as cache_root

# general.architecture -> what mtl imports it as (llama.cpp names Mistral "llama")
ARCHITECTURES = {"llama": "Llama, Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma 3"}
# The tensor types dequantised here (by transformers): floats and llama.cpp's legacy and k-quants.
TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
NEEDS = "pip install 'mtl[gguf]' (gguf, transformers and torch)"


def is_gguf(source: str) -> bool:
    return source.lower().endswith(".gguf")


def cache_dir() -> pathlib.Path:
    """The cache root; with the caches off, a folder in the system's temporary folder (a GGUF needs a folder)."""
    return pathlib.Path(tempfile.gettempdir()) / "mtl" if cache_root.is_off() else cache_root.root()


def check(path: str) -> dict:
    """The file's metadata that matters here, after checking its architecture and tensor types.

    Raises:
      ValueError: one line: not a GGUF file, the packages missing, an
        architecture or a tensor type that cannot be imported.
    """
    try:
        import gguf
    except ImportError:
        raise ValueError(f"--init {path}: reading GGUF needs {NEEDS}") from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: the reader's own errors vary)
        raise ValueError(f"--init {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        accepted = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        raise ValueError(f"--init {path}: GGUF architecture {arch!r} cannot be imported; supported: {accepted}")
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in TYPES:
            raise ValueError(
                f"--init {path}: tensor {tensor.name} is {kind}, a GGUF type mtl cannot dequantise; "
                f"supported: {', '.join(TYPES)}"
            )
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    return {"architecture": arch, "head_dim": int(key_length.contents()) if key_length is not None else None}


def folder_of(path: str) -> str:
    """The Hugging Face folder converted from GGUF file ``path`` (made on first use, then found in the cache).

    Raises:
      ValueError: one line (see :func:`check`), or the conversion's own failure.
    """
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|1".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{pathlib.Path(path).stem}-{key}"
    if (folder / "config.json").exists():
        return str(folder)
    meta = check(path)
    try:
        import torch
        import transformers
    except ImportError:
        raise ValueError(f"--init {path}: reading GGUF needs {NEEDS}") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    try:
        where, name = os.path.split(os.path.abspath(path))
        config = transformers.AutoConfig.from_pretrained(where, gguf_file=name)
        if meta["head_dim"] and getattr(config, "head_dim", None) != meta["head_dim"]:
            # transformers reads no head size for Qwen3 (its default, 128, is every released Qwen3's, not every file's)
            config.head_dim = meta["head_dim"]
        model = transformers.AutoModelForCausalLM.from_pretrained(
            where,
            gguf_file=name,
            config=config,
            dtype=torch.float32,
            quantization_config=transformers.GgufConfig(dequantize=True),
        )
        _save_dense(model, work)
        del model
        transformers.AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(work)
        _record_source(work, path)
        if not (folder / "config.json").exists():  # another process may have converted it meanwhile
            os.replace(work, folder)  # whole or not at all: a killed conversion leaves only a .converting- folder
    except Exception as e:  # noqa: BLE001  (transformers' loaders raise many kinds; one line names it)
        raise ValueError(f"--init {path}: transformers could not read it ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(folder)


def _save_dense(model, folder: pathlib.Path) -> None:
    """The dequantised model as safetensors and a config.json without the GGUF quantisation.

    transformers refuses ``save_pretrained`` on a model it loaded from GGUF
    (its GGUF quantiser is not serialisable) even when every weight was
    dequantised, so the tensors and the config are written here.
    """
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # the embedding's own tensor, shared
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(folder)


def _record_source(folder: pathlib.Path, path: str) -> None:
    """Notes in config.json where the folder came from (a reader of the cache sees which file it is)."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["mtl_gguf_source"] = os.path.abspath(path)
    config_path.write_text(json.dumps(config, indent=2))
