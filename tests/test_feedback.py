"""feedback: every scorer on tiny models of its real architecture, and the composite reward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import deberta_reward_model, gpt_neox_reward_model, t5_unieval

from refine_af import models
from refine_af.config import JudgeSettings, RewardSettings, ScorerSettings, load_config
from refine_af.errors import InputError
from refine_af.feedback import (
    NONFINITE,
    CompositeReward,
    JudgeScorer,
    RewardModelScorer,
    UniEvalModel,
    UniEvalScorer,
    build_scorers,
)
from refine_af.generation import TransformersBackend
from refine_af.instances_format import Instance, Parsed

INSTANCES = [
    Instance("Sort the numbers in ascending order.", "5, 1, 3", "1, 3, 5"),
    Instance("Sort the numbers in ascending order.", "5, 1, 3", "banana purple sky running"),
    Instance("Translate to French: Good morning", "", "Bonjour"),
    Instance("Write a haiku about rain.", "", "Soft rain on the roof\nwhispers to the town"),
    Instance("Write a haiku about rain.", "", "the the the the the the the the the"),
]


@pytest.fixture(scope="module")
def neox_rm_dir(bundled_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gpt_neox_reward_model(tmp_path_factory.mktemp("neox-rm"), bundled_model_dir)


@pytest.fixture(scope="module")
def deberta_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deberta_reward_model(tmp_path_factory.mktemp("deberta-rm"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return t5_unieval(tmp_path_factory.mktemp("unieval-t5"))


def reward_model(directory: Path, *, batch_size: int = 8, prompt_format: str = "auto"):
    return RewardModelScorer(
        models.load_tokenizer(str(directory)),
        models.load_sequence_classifier(str(directory), device="cpu"),
        prompt_format=prompt_format,
        max_length=256,
        batch_size=batch_size,
    )


def assert_batching_and_determinism(make_scorer) -> list[float]:
    """One float per instance, the same in any batch size, again on a second call."""
    batched = make_scorer(batch_size=16).score(INSTANCES)
    one_by_one = make_scorer(batch_size=1)
    singles = [one_by_one.score([instance])[0] for instance in INSTANCES]
    assert len(batched) == len(INSTANCES)
    assert all(isinstance(value, float) and math.isfinite(value) for value in batched)
    assert batched == pytest.approx(singles, abs=1e-5)
    assert make_scorer(batch_size=2).score(INSTANCES) == pytest.approx(batched, abs=1e-5)
    assert one_by_one.score(INSTANCES) == one_by_one.score(INSTANCES)
    return batched


# ---------------------------------------------------------------- reward model


def test_gpt_neox_reward_model_uses_the_openassistant_format(neox_rm_dir: Path) -> None:
    scorer = reward_model(neox_rm_dir)
    assert scorer.prompt_format == "oasst"
    encoded = scorer._encode(INSTANCES[:1])
    text = scorer.tokenizer.decode(encoded["input_ids"][0])
    eos = scorer.tokenizer.eos_token
    assert text == f"<|prompter|>{INSTANCES[0].instruction}\n5, 1, 3{eos}<|assistant|>1, 3, 5{eos}"
    # EOS ends the text; the pad id differs from it so pooling reads the last token
    assert scorer.model.config.pad_token_id != scorer.tokenizer.eos_token_id


def test_gpt_neox_reward_model_batches_and_is_deterministic(neox_rm_dir: Path) -> None:
    scores = assert_batching_and_determinism(lambda **kw: reward_model(neox_rm_dir, **kw))
    assert len(set(scores)) > 1


def test_deberta_reward_model_scores_sentence_pairs(deberta_rm_dir: Path) -> None:
    scorer = reward_model(deberta_rm_dir)
    assert scorer.prompt_format == "pair"
    ids = scorer._encode(INSTANCES[:1])["input_ids"][0].tolist()
    tokenizer = scorer.tokenizer
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
    scores = assert_batching_and_determinism(lambda **kw: reward_model(deberta_rm_dir, **kw))
    assert len(set(scores)) > 1


def test_reward_model_with_several_outputs_is_refused(tmp_path: Path) -> None:
    directory = deberta_reward_model(tmp_path / "two-labels", num_labels=2)
    with pytest.raises(InputError, match="has 2 outputs"):
        reward_model(directory)


# ---------------------------------------------------------------- UniEval


def unieval(t5_dir: Path, batch_size: int = 8) -> UniEvalModel:
    return UniEvalModel(
        models.load_tokenizer(str(t5_dir)),
        models.load_seq2seq_lm(str(t5_dir), device="cpu"),
        max_length=256,
        batch_size=batch_size,
    )


def test_unieval_asks_unievals_published_questions(t5_dir: Path) -> None:
    model = unieval(t5_dir)
    instance = INSTANCES[0]
    texts = {
        d: UniEvalScorer(model, d).question.format(output=instance.output, history="H")
        for d in ("naturalness", "coherence", "understandability")
    }
    assert texts == {
        "naturalness": "question: Is this a natural response in the dialogue? </s> "
        "response: 1, 3, 5",
        "coherence": "question: Is this a coherent response given the dialogue history? "
        "</s> response: 1, 3, 5 </s> dialogue history: H",
        "understandability": "question: Is this an understandable response in the dialogue? "
        "</s> response: 1, 3, 5",
    }


def test_unieval_score_is_yes_share_of_the_first_decoder_step(t5_dir: Path) -> None:
    model = unieval(t5_dir)
    scorer = UniEvalScorer(model, "coherence")
    scores = assert_batching_and_determinism(
        lambda batch_size: UniEvalScorer(unieval(t5_dir, batch_size), "coherence")
    )
    assert all(0.0 < s < 1.0 for s in scores)
    # UniEval's formula: softmax over the vocabulary, then P(Yes) / (P(Yes) + P(No))
    text = scorer.question.format(output=INSTANCES[0].output, history="Sort the numbers")
    encoded = model.tokenizer([text], return_tensors="pt")
    start = torch.full((1, 1), model.model.config.decoder_start_token_id)
    with torch.no_grad():
        probs = model.model(**encoded, decoder_input_ids=start).logits[0, 0].softmax(-1)
    expected = (probs[model.yes_id] / (probs[model.yes_id] + probs[model.no_id])).item()
    assert model.yes_share([text]) == pytest.approx([expected], abs=1e-6)
    assert model.tokenizer.convert_ids_to_tokens([model.yes_id, model.no_id]) == ["Yes", "No"]


# ---------------------------------------------------------------- LLM judge


def judge(directory: Path, dimension: str, *, chat: bool, batch_size: int = 8) -> JudgeScorer:
    backend = TransformersBackend.from_reference(
        str(directory), device="cpu", batch_size=batch_size
    )
    return JudgeScorer(backend, dimension, chat=chat)


def test_llm_judge_batches_and_is_deterministic(tiny_causal_lm_dir: Path) -> None:
    scores = assert_batching_and_determinism(
        lambda batch_size: judge(
            tiny_causal_lm_dir, "helpfulness", chat=False, batch_size=batch_size
        )
    )
    assert all(0.0 < s < 1.0 for s in scores)


def test_llm_judge_prompt_holds_question_request_and_response(tiny_causal_lm_dir: Path) -> None:
    plain = judge(tiny_causal_lm_dir, "coherence", chat=False).prompt(INSTANCES[0])
    assert plain == (
        "Dialogue history: Sort the numbers in ascending order.\n5, 1, 3\nResponse: 1, 3, 5\n\n"
        "Question: Is this a coherent response given the dialogue history? Answer Yes or No."
        "\nAnswer:"
    )
    chat_judge = judge(tiny_causal_lm_dir, "coherence", chat=True)
    chat = chat_judge.backend.render(chat_judge.prompt(INSTANCES[0]), chat=True)
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    assert plain.removesuffix("\nAnswer:") in chat


@pytest.mark.slow
def test_bundled_model_judges_all_four_questions() -> None:
    scorers = build_scorers(
        ScorerSettings(llm_judge=JudgeSettings(device="cpu")),
        [
            f"llm_judge.{d}"
            for d in ("helpfulness", "naturalness", "coherence", "understandability")
        ],
    )
    results = {name: scorer.score(INSTANCES[:1]) for name, scorer in scorers.items()}
    assert all(len(v) == 1 and 0.0 < v[0] < 1.0 for v in results.values())
    assert len({tuple(v) for v in results.values()}) == 4  # each question is its own score
    assert scorers["llm_judge.coherence"].score(INSTANCES[:1]) == results["llm_judge.coherence"]


# ---------------------------------------------------------------- building scorers


def test_build_scorers_loads_only_the_named_families(tiny_causal_lm_dir: Path) -> None:
    settings = ScorerSettings(
        llm_judge=JudgeSettings(model=str(tiny_causal_lm_dir), device="cpu"),
        reward_model={"model": "/nowhere/reward-model"},  # never loaded: not named
    )
    scorers = build_scorers(settings, ["llm_judge.naturalness", "llm_judge.helpfulness"])
    assert list(scorers) == ["llm_judge.naturalness", "llm_judge.helpfulness"]
    assert scorers["llm_judge.naturalness"].backend is scorers["llm_judge.helpfulness"].backend


def test_build_scorers_names_a_model_that_cannot_be_found() -> None:
    with pytest.raises(InputError, match="'/nowhere/unieval' not found"):
        build_scorers(ScorerSettings(unieval={"model": "/nowhere/unieval"}), ["unieval.coherence"])
    with pytest.raises(InputError, match=r"not-cached/reward-model.*HF_HUB_OFFLINE=1"):
        build_scorers(
            ScorerSettings(reward_model={"model": "not-cached/reward-model"}), ["reward_model"]
        )


# ---------------------------------------------------------------- composite reward


class FixedScorer:
    """Returns preset scores per output text and records what it was asked to score."""

    def __init__(self, name: str, by_output: dict[str, float]) -> None:
        self.name, self.by_output, self.seen = name, by_output, []

    def score(self, instances):
        self.seen.extend(instances)
        return [self.by_output[i.output] for i in instances]


def parsed(output: str) -> Parsed:
    return Parsed(Instance("task", "", output))


def test_composite_is_weighted_sum_plus_bias() -> None:
    a = FixedScorer("a", {"x": 0.5, "y": 2.0})
    b = FixedScorer("b", {"x": 1.0, "y": -1.0})
    reward = CompositeReward([(a, 2.0), (b, 0.5)], bias=0.25, floor=-3.0)
    batch = reward([parsed("x"), parsed("y")])
    assert batch.rewards == [2.0 * 0.5 + 0.5 * 1.0 + 0.25, 2.0 * 2.0 + 0.5 * -1.0 + 0.25]
    assert batch.scores == {"a": [0.5, 2.0], "b": [1.0, -1.0]}
    assert batch.failures == [None, None]


def test_unparsed_items_get_the_floor_are_counted_and_never_scored() -> None:
    a = FixedScorer("a", {"x": 0.5})
    reward = CompositeReward([(a, 1.0)], bias=1.0, floor=-3.0)
    batch = reward([Parsed(None, "truncated"), parsed("x"), Parsed(None, "missing_output")])
    assert batch.rewards == [-3.0, 1.5, -3.0]
    assert batch.scores == {"a": [None, 0.5, None]}
    assert [i.output for i in a.seen] == ["x"]
    assert batch.failure_counts() == {"truncated": 1, "missing_output": 1}
    assert reward.totals == {"scored": 3, "truncated": 1, "missing_output": 1}


def test_a_completion_of_several_instances_earns_their_mean_reward() -> None:
    a = FixedScorer("a", {"x": 0.5, "y": 2.0})
    reward = CompositeReward([(a, 2.0)], bias=0.25, floor=-3.0)
    batch = reward.per_completion(
        [
            [parsed("x"), parsed("y"), Parsed(None, "truncated")],
            [Parsed(None, "empty_output")],
            [parsed("y")],
        ]
    )
    assert batch.rewards == [2.0 * 1.25 + 0.25, -3.0, 2.0 * 2.0 + 0.25]
    assert batch.scores == {"a": [1.25, None, 2.0]}
    assert batch.failures == [None, "empty_output", None]
    assert reward.totals == {"scored": 3, "empty_output": 1}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_scores_become_the_floor_and_are_counted(bad: float) -> None:
    a = FixedScorer("a", {"x": 0.5, "y": 0.25})
    b = FixedScorer("b", {"x": bad, "y": 1.0})
    reward = CompositeReward([(a, 1.0), (b, 1.0)], floor=-2.0)
    batch = reward([parsed("x"), parsed("y")])
    assert batch.rewards == [-2.0, 1.25]
    assert batch.scores == {"a": [None, 0.25], "b": [None, 1.0]}
    assert batch.failures == [NONFINITE, None]
    assert all(math.isfinite(r) for r in batch.rewards)


def test_all_unparsed_batch_calls_no_scorer() -> None:
    a = FixedScorer("a", {})
    batch = CompositeReward([(a, 1.0)], floor=-1.0)([Parsed(None, "empty_output")])
    assert batch.rewards == [-1.0] and a.seen == []


def test_composite_from_settings_keeps_order_and_describes_itself() -> None:
    settings = RewardSettings(
        components=[
            {"scorer": "unieval.coherence", "weight": 0.5},
            {"scorer": "reward_model", "weight": 2},
        ],
        bias=0.1,
        floor=-5,
    )
    scorers = {
        "unieval.coherence": FixedScorer("unieval.coherence", {}),
        "reward_model": FixedScorer("reward_model", {}),
    }
    reward = CompositeReward.from_settings(settings, scorers)
    assert reward.definition() == {
        "formula": "r = sum(weight * score) + bias; floor if unparsed or non-finite",
        "components": [
            {"scorer": "unieval.coherence", "weight": 0.5},
            {"scorer": "reward_model", "weight": 2.0},
        ],
        "bias": 0.1,
        "floor": -5.0,
    }


# ---------------------------------------------------------------- reward configuration


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("[{scorer: unieval.fluency, weight: 1}]", "unknown scorer 'unieval.fluency'"),
        ("[{scorer: reward_model}]", r"components\.0\.weight: Field required"),
        ("[{weight: 1.0}]", r"components\.0\.scorer: Field required"),
        ("[{scorer: reward_model, weight: .nan}]", "finite number"),
        ("[{scorer: reward_model, weight: 1}, {scorer: reward_model, weight: 2}]", "only once"),
        ("[{scorer: reward_model, weight: 0}]", "non-zero weight"),
        ("[]", "at least one scorer"),
    ],
)
def test_bad_reward_components_are_input_errors(override: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_config("local-cpu", [f"stage2.reward.components={override}"])


def test_group_size_must_divide_the_batch() -> None:
    with pytest.raises(InputError, match="multiple of num_generations"):
        load_config("local-cpu", ["stage2.per_device_batch_size=3", "stage2.num_generations=2"])
