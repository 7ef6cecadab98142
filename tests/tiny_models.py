"""Tiny randomly initialised models of the scorers' real architectures, built offline.

GPT-NeoX reuses the bundled model's tokenizer; DeBERTa-v2 and T5 get a word-level
tokenizer trained here on a few sentences (their real tokenizers would need a download).
transformers is imported inside the builders: importing it while tests are collected
would read HF_HUB_OFFLINE before the session fixture sets it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

SENTENCES = [
    "question: Is this a natural response in the dialogue? response: dialogue history:",
    "Is this a coherent response given the dialogue history?",
    "Is this an understandable response in the dialogue?",
    "Yes No yes no",
    "Sort the numbers in ascending order. 1, 3, 5 Translate to French: Good morning Bonjour",
    "Write a haiku about rain. Soft rain on the roof whispers to the sleeping town",
    "banana purple sky running the a of and to is in it",
]


def _word_tokenizer(special: list[str], **roles: str) -> tuple[Tokenizer, dict[str, str]]:
    """A word-level tokenizer over SENTENCES, and its special-token roles."""
    backend = Tokenizer(WordLevel(unk_token=roles["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(SENTENCES, WordLevelTrainer(special_tokens=special))
    return backend, roles


def _save(model, tokenizer, target: Path) -> Path:
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def gpt_neox_reward_model(target: Path, tokenizer_dir: Path) -> Path:
    """GPT-NeoX sequence classifier (OpenAssistant's Pythia RM family), num_labels=1."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save(GPTNeoXForSequenceClassification(config), tokenizer, target)


def deberta_reward_model(target: Path, num_labels: int = 1) -> Path:
    """DeBERTa-v2 sequence classifier (OpenAssistant's DeBERTa RM family)."""
    from transformers import (
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    backend, roles = _word_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
    )  # fmt: skip
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id, relative_attention=True, position_buckets=16,
        pos_att_type=["p2c", "c2p"],
    )  # fmt: skip
    torch.manual_seed(0)
    return _save(DebertaV2ForSequenceClassification(config), tokenizer, target)


def t5_unieval(target: Path) -> Path:
    """T5 encoder-decoder with "Yes" and "No" in its vocabulary (UniEval's architecture)."""
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    backend, roles = _word_tokenizer(
        ["<pad>", "</s>", "<unk>"], pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save(T5ForConditionalGeneration(config), tokenizer, target)
