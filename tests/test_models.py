"""Model references: builtin alias (dequantized once), local dir, hub id, s3:// mirror."""

import json

import pytest

from refine_af import models, storage
from refine_af.errors import InputError


def test_builtin_alias_is_a_plain_safetensors_folder(bundled_model_dir):
    config = json.loads((bundled_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (bundled_model_dir / "model.safetensors").is_file()
    assert (bundled_model_dir / "tokenizer.json").is_file()


def test_second_load_does_not_dequantize_again(bundled_model_dir, monkeypatch):
    import transformers

    def no_gguf(*args, **kwargs):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    assert models.resolve("smollm2-135m-instruct") == str(bundled_model_dir)


def test_local_directory_loads(tiny_causal_lm_dir):
    tokenizer = models.load_tokenizer(str(tiny_causal_lm_dir))
    model = models.load_causal_lm(str(tiny_causal_lm_dir), device="cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not model.training and model.config.num_hidden_layers == 2


def test_absent_hub_id_offline_names_the_id():
    with pytest.raises(
        InputError, match=r"'acme/no-such-model' is not available: HF_HUB_OFFLINE=1"
    ):
        models.load_tokenizer("acme/no-such-model")


def test_unknown_reference():
    with pytest.raises(InputError, match="model 'no-such-alias' not found"):
        models.resolve("no-such-alias")


@pytest.mark.integration
def test_s3_prefix_is_mirrored_once(tiny_causal_lm_dir, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/models/tiny"
    for path in (p for p in tiny_causal_lm_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(tiny_causal_lm_dir).as_posix()
        storage.write_bytes(f"{uri}/{relative}", path.read_bytes())
    model = models.load_causal_lm(uri, device="cpu")
    assert model.config.num_hidden_layers == 2
    local = models.resolve(uri)
    assert local.startswith(str(tmp_path / "cache"))

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(storage, "download_dir", no_download)
    assert models.resolve(uri) == local


@pytest.mark.integration
def test_empty_s3_prefix_is_a_clear_error(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="nothing found at that S3 prefix"):
        models.resolve(f"s3://{s3_bucket}/models/missing")
