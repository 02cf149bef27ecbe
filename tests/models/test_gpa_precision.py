"""PromptSRC's Gaussian prompt aggregation keeps its precision when only far-from-the-mean epochs ran."""

from __future__ import annotations

import torch

from kdprompt.models.prompt_methods.promptsrc import GaussianPromptAggregation


def test_one_epoch_far_from_the_mean_ships_that_epochs_prompts():
    # Epoch 1 of 20 at mean 15, std 1 weighs 1.1e-43: subnormal in float32.
    gpa = GaussianPromptAggregation(epochs=20, mean=15, std=1)
    state = {"ctx": torch.randn(4, 16), "vision.0": torch.randn(4, 32)}
    gpa.epoch_end(1, state)
    result = gpa.result()
    assert result is not None
    for key, value in state.items():
        assert result[key].dtype == torch.float32
        torch.testing.assert_close(result[key], value, rtol=1e-6, atol=1e-7)


def test_checkpointed_aggregation_resumes_to_the_same_result():
    states = [{"ctx": torch.randn(3, 8)} for _ in range(3)]
    whole = GaussianPromptAggregation(epochs=3, mean=2, std=1)
    for epoch, state in enumerate(states, start=1):
        whole.epoch_end(epoch, state)
    first = GaussianPromptAggregation(epochs=3, mean=2, std=1)
    first.epoch_end(1, states[0])
    resumed = GaussianPromptAggregation(epochs=3, mean=2, std=1)
    resumed.load(first.tensors(), first.counters())
    for epoch, state in enumerate(states[1:], start=2):
        resumed.epoch_end(epoch, state)
    assert torch.equal(whole.result()["ctx"], resumed.result()["ctx"])
