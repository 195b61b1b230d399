"""Dataset loaders on small local files with the Hub schemas (no network), prompts, and the task registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_diffpo.data import (
    SYSTEM_PROMPT,
    build_prompt,
    load_countdown,
    load_gsm8k,
    load_math500,
    load_sudoku_file,
    use_chat_format,
)
from trl_diffpo.rewards import MathVerifier, extract_boxed, make_math_accuracy_reward
from trl_diffpo.tasks import TASKS, Task, get_task, list_tasks, register_task

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_TRAIN = FIXTURES / "gsm8k_train.jsonl"
GSM8K_TEST = FIXTURES / "gsm8k_test.jsonl"
MATH500 = FIXTURES / "math500_test.jsonl"
COUNTDOWN = FIXTURES / "countdown_train.jsonl"
SUDOKU_CSV = FIXTURES / "sudoku_4x4.csv"


@pytest.fixture(scope="module")
def inline_math_reward():
    return make_math_accuracy_reward(MathVerifier(use_subprocess=False), name="inline_math")


class _NoTemplateTokenizer:
    chat_template = None


# ---------------------------------------------------------------------------------------------------- prompts
class TestPrompts:
    def test_plain_prompt(self):
        assert build_prompt("Q?", chat=False) == f"{SYSTEM_PROMPT}\n\nQ?"
        assert build_prompt("Q?", chat=False, system_prompt=None) == "Q?"

    def test_chat_prompt_with_system_message(self):
        assert build_prompt("Q?", chat=True) == [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "Q?"},
        ]

    def test_chat_prompt_system_in_user_message(self):
        assert build_prompt("Q?", chat=True, system_prompt="S", system_role=False) == [
            {"role": "user", "content": "S\n\nQ?"}
        ]

    def test_format_follows_the_tokenizer(self, char_tokenizer):
        assert use_chat_format(char_tokenizer) is True
        assert use_chat_format(_NoTemplateTokenizer()) is False
        assert use_chat_format(None) is False
        assert use_chat_format(char_tokenizer, chat=False) is False

    def test_system_prompt_asks_for_the_rewarded_layout(self):
        for tag in ("<reasoning>", "</reasoning>", "<answer>", "</answer>"):
            assert tag in SYSTEM_PROMPT

    def test_chat_prompt_renders_with_a_template(self, char_tokenizer):
        prompt = build_prompt("2+3?", tokenizer=char_tokenizer)
        text = char_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert "2+3?" in text and text.endswith("A:")


# ---------------------------------------------------------------------------------------------------- loaders
class TestGsm8k:
    def test_columns_and_final_answers(self):
        rows = load_gsm8k("train", data_files=GSM8K_TRAIN, chat=False)
        assert rows.column_names == ["prompt", "question", "answer", "solution"]
        assert rows["answer"] == ["100", "1200", "18"]
        assert rows[1]["solution"].endswith("#### 1,200")
        assert rows[0]["prompt"].startswith(SYSTEM_PROMPT) and rows[0]["prompt"].endswith(rows[0]["question"])

    def test_chat_prompts_with_template_tokenizer(self, char_tokenizer):
        rows = load_gsm8k("test", data_files=str(GSM8K_TEST), tokenizer=char_tokenizer)
        assert [message["role"] for message in rows[0]["prompt"]] == ["system", "user"]
        assert rows[0]["prompt"][1]["content"] == rows[0]["question"]
        assert isinstance(
            load_gsm8k("test", data_files=GSM8K_TEST, tokenizer=_NoTemplateTokenizer())[0]["prompt"], str
        )

    def test_num_examples(self):
        assert len(load_gsm8k("train", data_files=GSM8K_TRAIN, num_examples=2)) == 2

    def test_answers_feed_the_reward(self, inline_math_reward):
        rows = load_gsm8k("train", data_files=GSM8K_TRAIN, chat=False)
        completions = [
            f"<reasoning>\nwork\n</reasoning>\n<answer>\n{answer}\n</answer>" for answer in ("100", "1,200", "17")
        ]
        assert inline_math_reward(rows["prompt"], completions, **rows[:]) == [1.0, 1.0, 0.0]

    def test_wrong_schema_is_a_clear_error(self):
        with pytest.raises(ValueError, match="question"):
            load_gsm8k("train", data_files=COUNTDOWN)

    def test_unsupported_file_type(self, tmp_path):
        path = tmp_path / "rows.txt"
        path.write_text("x")
        with pytest.raises(ValueError, match="unsupported file type"):
            load_gsm8k("train", data_files=path)


class TestMath500:
    def test_columns_and_prompt(self):
        rows = load_math500(data_files=MATH500, chat=False)
        assert rows.column_names == ["prompt", "problem", "solution", "answer", "subject", "level", "unique_id"]
        assert rows[0]["problem"] in rows[0]["prompt"]
        assert rows["level"] == [1, 2, 1]

    def test_gold_answers_agree_with_the_reference_solutions(self, inline_math_reward):
        rows = load_math500(data_files=MATH500, chat=True)
        completions = [
            [{"role": "assistant", "content": f"<answer>{extract_boxed(s)}</answer>"}] for s in rows["solution"]
        ]
        assert inline_math_reward(rows["prompt"], completions, **rows[:]) == [1.0, 1.0, 1.0]


class TestCountdown:
    def test_local_files_are_the_requested_split(self):
        rows = load_countdown("test", data_files=COUNTDOWN, num_numbers=3, chat=False)
        assert len(rows) == 8  # no held-out slicing of local files unless test_size is given

    def test_all_rows_without_held_out_slice(self):
        rows = load_countdown("train", data_files=COUNTDOWN, test_size=0, chat=False)
        assert rows.column_names == ["prompt", "target", "nums"]
        assert len(rows) == 10
        assert rows[0]["target"] == 24 and rows[0]["nums"] == [2, 3, 4]
        assert "2, 3, 4" in rows[0]["prompt"] and "24" in rows[0]["prompt"]

    def test_three_number_filter(self):
        rows = load_countdown("train", data_files=COUNTDOWN, num_numbers=3)
        assert len(rows) == 8 and all(len(nums) == 3 for nums in rows["nums"])

    def test_held_out_split_is_disjoint_and_deterministic(self):
        train = load_countdown("train", data_files=COUNTDOWN, test_size=3, split_seed=7, chat=False)
        test = load_countdown("test", data_files=COUNTDOWN, test_size=3, split_seed=7, chat=False)
        again = load_countdown("test", data_files=COUNTDOWN, test_size=3, split_seed=7, chat=False)
        assert len(train) == 7 and len(test) == 3
        key = lambda rows: {(row["target"], tuple(row["nums"])) for row in rows}  # noqa: E731
        assert not key(train) & key(test)
        assert key(test) == key(again)

    def test_split_errors(self):
        with pytest.raises(ValueError, match="test_size"):
            load_countdown("train", data_files=COUNTDOWN, test_size=50)
        with pytest.raises(ValueError, match="split"):
            load_countdown("validation", data_files=COUNTDOWN, test_size=2)


class TestSudokuFile:
    def test_capitalised_columns_and_encoding(self):
        rows = load_sudoku_file(SUDOKU_CSV, chat=False)
        assert rows.column_names == ["prompt", "puzzle", "solution"]
        assert rows[0]["puzzle"] == "1000020000344302" and rows[0]["solution"] == "1423324121344312"
        assert "1000\n0200\n0034\n4302" in rows[0]["prompt"]

    def test_json_with_nested_lists_and_separators(self, tmp_path):
        path = tmp_path / "grids.jsonl"
        rows = [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 4], [4, 3, 0, 2]]
        path.write_text(json.dumps({"puzzle": rows, "solution": "1423|3241|2134|4312"}) + "\n")
        loaded = load_sudoku_file(path, chat=True)
        assert loaded[0]["puzzle"] == "1000020000344302" and loaded[0]["solution"] == "1423324121344312"
        assert loaded[0]["prompt"][-1]["role"] == "user"

    def test_unreadable_grid(self, tmp_path):
        path = tmp_path / "bad.csv"
        path.write_text("puzzle,solution\n123,456\n")
        with pytest.raises(ValueError, match="Unreadable"):
            load_sudoku_file(path)


# ---------------------------------------------------------------------------------------------------- registry
class TestTaskRegistry:
    def test_registered_tasks(self):
        assert {"gsm8k", "math500", "countdown", "sudoku"} <= set(list_tasks())
        for task in TASKS.values():
            assert len(task.reward_funcs) == len(task.reward_weights)
            assert all(callable(reward) and reward.__name__ for reward in task.reward_funcs)

    def test_unknown_task(self):
        with pytest.raises(KeyError, match="gsm8k"):
            get_task("chess")

    @pytest.mark.parametrize(
        ("name", "split", "kwargs", "answer_column"),
        [
            ("gsm8k", "test", {"data_files": GSM8K_TEST}, "answer"),
            ("math500", "test", {"data_files": MATH500}, "answer"),
            ("countdown", "test", {"data_files": COUNTDOWN, "test_size": 2}, "target"),
            ("countdown", "train", {"generated": True, "num_examples": 5}, "nums"),
            ("sudoku", "test", {"num_examples": 5}, "puzzle"),
            ("sudoku", "train", {"data_files": SUDOKU_CSV}, "solution"),
        ],
    )
    def test_load_and_reward(self, name, split, kwargs, answer_column):
        task = get_task(name)
        rows = task.load(split, chat=False, **kwargs)
        assert "prompt" in rows.column_names and answer_column in rows.column_names
        batch = rows[:]
        for reward in task.reward_funcs:  # as TRL calls them: every dataset column as a keyword
            columns = {key: value for key, value in batch.items() if key != "prompt"}  # TRL drops "prompt"
            scores = reward(
                prompts=rows["prompt"],
                completions=["no answer"] * len(rows),
                completion_ids=[[0]] * len(rows),
                nfe=[1] * len(rows),
                trainer_state=None,
                **columns,
            )
            assert len(scores) == len(rows) and all(score is not None for score in scores)

    def test_countdown_defaults_to_three_numbers(self):
        rows = get_task("countdown").load("train", data_files=COUNTDOWN, test_size=2)
        assert all(len(nums) == 3 for nums in rows["nums"])

    def test_is_correct_for_accuracy(self):
        task = get_task("countdown")
        columns = {"target": [21, 21, 21], "nums": [[7, 3, 9]] * 3, "prompt": ["p"] * 3}
        completions = ["<answer>(7/3)*9</answer>", "<answer>7*3*9</answer>", "nothing"]
        assert task.is_correct(completions, **columns) == [True, False, False]  # partial credit is not correct

    def test_is_correct_sudoku_uses_strict_variant(self):
        task = get_task("sudoku")
        rows = task.load("test", num_examples=2, chat=False)
        completions = [f"<answer>{rows[0]['solution']}</answer>", f"<answer>{rows[1]['puzzle']}</answer>"]
        assert task.is_correct(completions, **rows[:]) == [True, False]

    def test_rows_lacking_answers_are_not_correct(self, caplog):
        assert get_task("countdown").is_correct(["<answer>1+2</answer>"], target=[3]) == [False]
        assert "lack the answer columns" in caplog.text

    def test_math500_is_evaluation_only(self):
        task = get_task("math500")
        assert task.train_split is None and task.eval_split == "test"
        with pytest.raises(ValueError, match="evaluation-only"):
            task.load()

    def test_generated_countdown_needs_a_size(self):
        with pytest.raises(ValueError, match="num_examples"):
            get_task("countdown").load("train", generated=True)

    def test_register_custom_task(self):
        def constant_reward(prompts, completions, completion_ids=None, **kwargs):
            return [1.0] * len(completions)

        task = Task("constant", "always right", lambda split: None, (constant_reward,), (1.0,), constant_reward, ())
        try:
            register_task(task)
            assert get_task("constant").is_correct(["x", "y"]) == [True, True]
            with pytest.raises(ValueError, match="already registered"):
                register_task(task)
            register_task(task, overwrite=True)
        finally:
            TASKS.pop("constant", None)

    def test_mismatched_weights(self):
        with pytest.raises(ValueError, match="weights"):
            Task("bad", "", lambda split: None, (len,), (1.0, 2.0), len, ())
