"""lokid.prompt: human input goes into a prompt whole; what does not fit waits."""

from __future__ import annotations

from lokid.prompt import MAX_INPUT_BYTES_PER_PROMPT, PromptTask, build_prompt, inputs_that_fit

BIGGEST = MAX_INPUT_BYTES_PER_PROMPT  # the API's bound for one message, in bytes


def test_inputs_that_fit_together_go_in_one_prompt() -> None:
    assert inputs_that_fit([]) == 0
    assert inputs_that_fit(["a", "b", "c"]) == 3
    assert inputs_that_fit(["x" * (BIGGEST - 1), "y"]) == 2


def test_the_rest_waits_but_the_first_always_goes() -> None:
    assert inputs_that_fit(["x" * BIGGEST, "y"]) == 1
    assert inputs_that_fit(["x" * 60_000, "y" * 60_000, "z"]) == 1
    assert inputs_that_fit(["\u00e9" * (BIGGEST // 2), "y"]) == 1  # bytes, not characters


def test_an_input_of_the_biggest_size_is_in_the_prompt_whole() -> None:
    message = "x" * (BIGGEST - 1) + "!"
    prompt = build_prompt(
        PromptTask("prd-001", "Title", ""), prd_path="/p/prd.md", human_input=[message]
    )
    assert message in prompt
