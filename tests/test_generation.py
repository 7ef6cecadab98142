"""Batched generation: order, stop strings, finish reasons, seeds, Yes/No probabilities."""

import pytest

from refine_af.generation import SamplingParams, TransformersBackend, cut_at_stop, length_batches


def test_cut_at_the_earliest_stop_string():
    assert cut_at_stop("a\n\nb 16. c", ["16.", "\n\n"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert cut_at_stop("abc", []) == ("abc", False)


@pytest.fixture(scope="module")
def tiny_backend(tiny_causal_lm_dir):
    return TransformersBackend.from_reference(str(tiny_causal_lm_dir), device="cpu", batch_size=3)


def test_every_prompt_gets_its_own_completion_in_order(tiny_backend):
    prompts = ["a", "a much longer prompt than the others", "mid length prompt", "b", "c"]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    batched = tiny_backend.generate(prompts, params)
    alone = [tiny_backend.generate([p], params)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.finish_reason == "length" and c.num_tokens == 6 for c in batched)


def test_same_seed_same_samples(tiny_backend):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    first = tiny_backend.generate(["x", "y"], params)
    assert tiny_backend.generate(["x", "y"], params) == first


def test_yes_probability_is_a_probability(tiny_backend):
    shares = tiny_backend.yes_probability(["Is it? ", "Really? Answer:", "x"])
    assert len(shares) == 3 and all(0.0 <= s <= 1.0 for s in shares)
    assert tiny_backend.yes_probability(["Really? Answer:"])[0] == pytest.approx(shares[1])


@pytest.mark.slow
def test_bundled_model_answers_and_stops(bundled_model_dir):
    backend = TransformersBackend.from_reference(str(bundled_model_dir), device="cpu")
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0)
    (paris,) = backend.generate(["What is the capital of France?"], greedy, chat=True)
    assert "Paris" in paris.text and paris.finish_reason == "stop"
    counting = SamplingParams(max_new_tokens=32, temperature=0.0, stop=("\n7",))
    (numbers,) = backend.generate(["1\n2\n3\n4\n5\n"], counting)
    assert numbers.text == "6" and numbers.finish_reason == "stop"


def test_length_batches_take_every_index_once_longest_first() -> None:
    texts = ["ccc", "a", "eeeee", "bb", "dddd"]
    batches = length_batches(texts, 2)
    assert batches == [[2, 4], [0, 3], [1]]
    assert length_batches([], 4) == []
