"""Rewards: every extraction rule and scoring branch on hand-written completions, plus property-based robustness."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_diffpo.rewards import (
    REWARD_FALLBACKS,
    MathVerifier,
    answer_expression_forms,
    completion_to_text,
    countdown_accuracy_reward,
    countdown_reward,
    extract_boxed,
    extract_countdown_expression,
    extract_math_answer,
    extract_sudoku_grid,
    extract_xml_answer,
    gsm8k_accuracy_reward,
    is_soft_format,
    is_strict_format,
    judge_countdown,
    make_countdown_reward,
    make_math_accuracy_reward,
    math_accuracy_reward,
    normalize_gold_answer,
    parse_arithmetic,
    parse_grid,
    soft_format_reward,
    strict_format_reward,
    sudoku_reward,
    sudoku_strict_reward,
    xml_count_reward,
)
from trl_diffpo.rewards import math_verifier as math_verifier_module
from trl_diffpo.rewards.countdown import MAX_EXPRESSION_CHARS, MAX_LITERAL_DIGITS, MAX_PAREN_DEPTH

GSM8K_COMPLETION = """<reasoning>
Each day she makes 12 + 8 = 20 loaves.
Over 5 days that is 20 * 5 = 100 loaves.
</reasoning>
<answer>
100
</answer>"""

# a puzzle with a unique solution, its solution, and a valid grid that ignores the givens
SUDOKU_PUZZLE = "1000020000344302"
SUDOKU_SOLUTION = "1423324121344312"
OTHER_VALID_GRID = "1234341221434321"
# extra columns TRL passes to every reward: they must be accepted and ignored
TRL_EXTRAS = {
    "nfe": [12, 30],
    "threshold": [0.9, 0.5],
    "trainer_state": object(),
    "log_extra": lambda *args, **kwargs: None,
    "log_metric": lambda *args, **kwargs: None,
    "prompt": ["p", "q"],
}


def grid_text(grid: str) -> str:
    return "\n".join(grid[row : row + 4] for row in range(0, 16, 4))


@pytest.fixture(scope="module")
def verifier():
    instance = MathVerifier(timeout_s=2.0)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def math_reward(verifier):
    return make_math_accuracy_reward(verifier=verifier, name="test_math_reward")


# ---------------------------------------------------------------------------------------------------- extraction
class TestCompletionToText:
    def test_plain_string(self):
        assert completion_to_text("hello") == "hello"

    def test_conversation_uses_last_assistant_message(self):
        conversation = [
            {"role": "system", "content": "sys"},
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "second"},
            {"role": "user", "content": "trailing user turn"},
        ]
        assert completion_to_text(conversation) == "second"

    def test_conversation_without_assistant_uses_last_message(self):
        assert completion_to_text([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]) == "b"

    def test_multimodal_content_parts(self):
        message = {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "image"}, {"text": "y"}]}
        assert completion_to_text([message]) == "xy"

    @pytest.mark.parametrize("value", [None, 42, [], [1, 2], b"bytes", {"role": "assistant"}])
    def test_unusable_values_become_empty(self, value):
        assert completion_to_text(value) == ""


class TestXmlAndBoxed:
    def test_last_answer_block_wins(self):
        assert extract_xml_answer("<answer>1</answer> text <answer>\n 2 \n</answer>") == "2"

    def test_unclosed_final_answer_runs_to_end(self):
        assert extract_xml_answer("<answer>1</answer><answer> 7 and more") == "7 and more"

    def test_no_answer_tag(self):
        assert extract_xml_answer("the answer is 3") is None

    def test_boxed_balanced_braces(self):
        assert extract_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"

    def test_boxed_last_wins_and_fbox(self):
        assert extract_boxed(r"\boxed{1} then \fbox{2}") == "2"

    def test_unclosed_last_box_runs_to_the_end_of_its_line(self):
        # decision: the last box is the final answer even when its brace is lost (was "3": an earlier box)
        assert extract_boxed(r"\boxed{3} and \boxed{4") == "4"
        assert extract_boxed("\\boxed{20\n</answer>") == "20"
        assert extract_boxed("\\boxed{\\frac{1}{2}\nmore text") == r"\frac{1}{2}"

    def test_box_without_backslash_and_empty_boxes(self):
        assert extract_boxed("so boxed{4}.") == "4"
        assert extract_boxed("fbox{7}") == "7"
        assert extract_boxed(r"\boxed{5} then \boxed{ }") == "5"  # an empty box is skipped
        assert extract_boxed(r"\boxed{}") is None

    def test_boxed_is_not_a_backspace_escape(self):
        text = "\\boxed{5}"  # a real backslash followed by b
        assert "\b" not in text and extract_boxed(text) == "5"
        assert extract_boxed("\boxed{5}") is None  # a backspace character is not the command

    def test_math_answer_prefers_boxed_inside_answer(self):
        assert extract_math_answer(r"\boxed{1} <answer>so \boxed{2}</answer>") == "2"

    def test_math_answer_block_text(self):
        assert extract_math_answer("<answer> 42 </answer>") == "42"

    def test_math_answer_boxed_anywhere_without_tags(self):
        assert extract_math_answer(r"We get \boxed{x+1}.") == "x+1"

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("<reasoning>x</reasoning>\n<answer>\n\\boxed{20\n</answer>", "20"),  # brace never closed
            ("<answer>boxed{4}</answer>", "4"),  # no backslash
            ("<answer>\\boxed{}101</answer>", "101"),  # empty box, plain answer
            ("<answer>\\fbox{} 12 \\boxed{ }</answer>", "12"),
            ("6 * 5 = 30 ...</answer>\n\n<answer></answer>\n\n\\boxed{5}", "5"),  # after an empty block
            ("<answer>\n</answer> so boxed{9}", "9"),
        ],
    )
    def test_math_answer_defect_classes(self, text, expected):
        assert extract_math_answer(text) == expected

    @pytest.mark.parametrize(
        ("answer", "forms"),
        [
            ("130 dollars", ["130 dollars", "130"]),
            (r"5 \text{ square feet}", [r"5 \text{ square feet}", "5"]),
            ("The answer is 14", ["The answer is 14", "14"]),
            ("Answer: 3/4.", ["Answer: 3/4.", "3/4"]),
            (r"\$18", [r"\$18", "18"]),
            ("13 or 14", ["13 or 14"]),  # nothing is picked out of a longer answer
            ("x = 7, y = 14", ["x = 7, y = 14"]),
            ("-4u + 14", ["-4u + 14"]),
            ("u + 14 apples", ["u + 14 apples"]),  # unit words are stripped only after a plain value
        ],
    )
    def test_answer_expression_forms(self, answer, forms):
        assert answer_expression_forms(answer) == forms

    def test_math_answer_none(self):
        assert extract_math_answer("no answer here") is None
        assert extract_math_answer("<answer>   </answer>") is None

    @pytest.mark.parametrize(
        ("gold", "expected"),
        [
            ("Step 1...\n#### 1,200", "1200"),
            ("#### 7 ", "7"),
            (r" \frac{1}{2} ", r"\frac{1}{2}"),
            (None, None),
            ("", None),
        ],
    )
    def test_normalize_gold_answer(self, gold, expected):
        assert normalize_gold_answer(gold) == expected


# ---------------------------------------------------------------------------------------------------- math
class TestMathRewards:
    def test_gsm8k_multiline_completion_correct(self, math_reward):
        assert math_reward(None, [GSM8K_COMPLETION], answer=["Work...\n#### 100"]) == [1.0]

    def test_gsm8k_default_reward_with_trl_extras(self):
        completions = [GSM8K_COMPLETION, GSM8K_COMPLETION.replace("100\n</answer>", "99\n</answer>")]
        assert gsm8k_accuracy_reward(["p", "q"], completions, None, answer=["100", "100"], **TRL_EXTRAS) == [1.0, 0.0]

    def test_conversational_completion(self, math_reward):
        completion = [{"role": "assistant", "content": "<reasoning>\n3*6\n</reasoning>\n<answer>\n$18\n</answer>"}]
        assert math_reward(None, [completion], answer=["#### 18"]) == [1.0]

    def test_comma_separated_number(self, math_reward):
        assert math_reward(None, ["<answer>1,200</answer>"], answer=["#### 1,200"]) == [1.0]

    @pytest.mark.parametrize(
        ("prediction", "gold"),
        [
            (r"<answer>\dfrac{14}{3}</answer>", r"\frac{14}{3}"),
            (r"<answer>The result is \boxed{\frac{14}{3}}</answer>", r"\frac{14}{3}"),
            (r"<answer>(3, \frac{\pi}{2})</answer>", r"\left( 3, \frac{\pi}{2} \right)"),
            (r"<answer>\text{(B)}</answer>", r"\text{(B)}"),
            (r"Thus \boxed{0.5}", r"\frac{1}{2}"),
        ],
    )
    def test_math500_equivalences(self, math_reward, prediction, gold):
        assert math_reward(None, [prediction], answer=[gold]) == [1.0]

    @pytest.mark.parametrize(
        "answer",
        [
            r"\boxed{-4u + 14}",
            "13 or 14",
            "x = 7, y = 14",
            "u + 14",
            r"\{1, 2, 14\}",
            "14 or 15",
            r"14 \text{ or } 15",
            "between 13 and 14",
            "14, 28",
            r"\boxed{14 + u}",
            "so 14",
        ],
    )
    def test_a_number_inside_a_longer_answer_is_not_the_answer(self, math_reward, answer):
        # before: the judge retried the raw text and math_verify took its last number, scoring these 1.0
        assert math_reward(None, [f"<answer>{answer}</answer>"], answer=["14"]) == [0.0]
        assert math_reward(None, [f"Thus {answer}"], answer=["14"]) == [0.0]

    @pytest.mark.parametrize(
        "answer",
        ["130 dollars", r"130 \text{ dollars}", r"\$130", "The answer is 130", "130.", r"\boxed{130}", "x = 130"],
    )
    def test_final_answer_with_units_or_a_phrase_still_matches(self, math_reward, answer):
        assert math_reward(None, [f"<answer>{answer}</answer>"], answer=["130"]) == [1.0]

    @pytest.mark.parametrize(
        "completion",
        [
            "<answer>\n\\boxed{20\n</answer>",
            "<answer>boxed{20}</answer>",
            "<answer>\\boxed{}20</answer>",
            "We get 4 * 5 = 20.</answer>\n\n<answer></answer>\n\n\\boxed{20}",
        ],
    )
    def test_gsm8k_defect_classes_score_one(self, math_reward, completion):
        assert math_reward(None, [completion], answer=["#### 20"]) == [1.0]

    def test_wrong_and_missing_answers_score_zero(self, math_reward):
        completions = [r"<answer>\frac{13}{3}</answer>", "I think it is 14/3.", ""]
        assert math_reward(None, completions, answer=[r"\frac{14}{3}"] * 3) == [0.0, 0.0, 0.0]

    def test_rows_without_answer_get_none(self, math_reward):
        assert math_reward(None, ["<answer>1</answer>"] * 2) == [None, None]
        assert math_reward(None, ["<answer>1</answer>"] * 2, answer=["1", None]) == [1.0, None]

    def test_names_for_trl_logging(self, math_reward):
        assert gsm8k_accuracy_reward.__name__ == "gsm8k_accuracy_reward"
        assert math_accuracy_reward.__name__ == "math_accuracy_reward"
        assert math_reward.__name__ == "test_math_reward"


class TestMathVerifier:
    def test_power_tower_times_out_and_worker_recovers(self):
        verifier = MathVerifier(timeout_s=1.0)
        try:
            assert verifier.is_equivalent("42", r"9^{9^{9^{9}}}") is False
            assert verifier.stats["timeouts"] == 1
            assert verifier.is_equivalent("42", "42") is True  # a fresh worker answers
            assert verifier.stats["worker_starts"] == 2
        finally:
            verifier.close()

    def test_timeouts_are_logged_through_trl_log_metric(self):
        verifier = MathVerifier(timeout_s=1.0)
        reward = make_math_accuracy_reward(verifier, name="logged")
        logged = []
        try:
            completions = [r"<answer>9^{9^{9^{9}}}</answer>", "<answer>42</answer>"]
            scores = reward(None, completions, answer=["42", "42"], log_metric=lambda n, v: logged.append((n, v)))
        finally:
            verifier.close()
        assert scores == [0.0, 1.0]
        assert logged == [("rewards/logged/verifier_timeouts", 1.0), ("rewards/logged/verifier_over_budget", 0.0)]

    def test_over_long_answer_is_rejected_without_parsing(self, verifier):
        before = verifier.stats["too_long"]
        assert verifier.is_equivalent("1", "1" * (verifier.max_answer_chars + 1)) is False
        assert verifier.stats["too_long"] == before + 1

    def test_empty_inputs(self, verifier):
        assert verifier.is_equivalent("", "1") is False and verifier.is_equivalent("1", "  ") is False

    def test_worker_killed_from_outside_is_replaced(self, verifier):
        assert verifier.is_equivalent("2", "2")
        verifier._workers[0].proc.kill()
        verifier._workers[0].proc.wait()
        assert verifier.is_equivalent("3", "3")  # the dead worker is noticed and restarted

    def test_usable_from_a_thread(self, verifier):
        results = []
        thread = threading.Thread(target=lambda: results.append(verifier.is_equivalent(r"\frac{1}{2}", "0.5")))
        thread.start()
        thread.join(timeout=60)
        assert results == [True]

    def test_in_process_mode_agrees(self, verifier):
        inline = MathVerifier(use_subprocess=False)
        pairs = [("42", "42"), (r"\frac{1}{2}", "0.5"), ("3", "4"), (r"\text{(B)}", r"\text{(B)}")]
        assert [inline.is_equivalent(*pair) for pair in pairs] == [verifier.is_equivalent(*pair) for pair in pairs]

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
    def test_worker_dies_with_its_parent(self):
        # load the verifier module by path: importing the whole package would make this test slow
        script = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('verifier', {str(math_verifier_module.__file__)!r})\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "verifier = module.MathVerifier(timeout_s=600)\n"
            "verifier.is_equivalent('1', '1')\n"
            "print(verifier._workers[0].proc.pid, flush=True)\n"
            "verifier.is_equivalent('1', '9^{9^{9^{9}}}')\n"  # busy for ever while the parent is killed
        )
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        worker_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        for _ in range(100):
            if not _process_alive(worker_pid):
                break
            time.sleep(0.1)
        assert not _process_alive(worker_pid)

    def test_invalid_timeout(self):
        with pytest.raises(ValueError, match="timeout_s"):
            MathVerifier(timeout_s=0)
        with pytest.raises(ValueError, match="num_workers"):
            MathVerifier(num_workers=0)
        with pytest.raises(ValueError, match="batch_budget_s"):
            MathVerifier(batch_budget_s=0)

    def test_batch_is_judged_in_parallel_within_its_budget(self):
        # 4 hanging answers and 4 good ones on 2 workers: a hanging answer costs a 1 s timeout plus a worker restart,
        # so the 2 s budget ends the batch before all 4 have had their second. Before, one worker judged the items
        # one after another with no batch limit (8 hostile answers held one reward call for 46 s).
        verifier = MathVerifier(timeout_s=1.0, num_workers=2, batch_budget_s=2.0)
        hanging = [r"9^{9^{9^{9}}}", r"8^{9^{9^{9}}}", r"7^{9^{9^{9}}}", r"6^{9^{9^{9}}}"]
        try:
            verdicts = verifier.judge_many([("42", answer) for answer in hanging] + [("42", "42")] * 4)
            assert verifier.stats["worker_starts"] >= 2
            assert verdicts[4:] == [True] * 4  # the shortest answers go first, and repeats are judged once
            assert verdicts[:4] == [False] * 4
            assert verifier.stats["cached"] == 3
            assert verifier.stats["timeouts"] + verifier.stats["over_budget"] == 4
            assert verifier.stats["over_budget"] >= 1
            assert verifier.judge_many([("1", "1"), ("2", "3")]) == [True, False]  # the pool recovers
        finally:
            verifier.close()

    def test_configure_changes_limits(self):
        verifier = MathVerifier(timeout_s=1.0, num_workers=1, batch_budget_s=None)
        verifier.configure(timeout_s=2.0, num_workers=3)
        assert (verifier.timeout_s, verifier.num_workers, verifier.batch_budget_s) == (2.0, 3, None)
        verifier.configure(batch_budget_s=7)
        assert verifier.batch_budget_s == 7.0


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------------- countdown
def reference_value(expression: str) -> Fraction | None:
    """Slow, obviously-correct reference: Python's own parser for the syntax, Fractions for the arithmetic."""

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return None if right == 0 else left / right

    return walk(ast.parse(expression, mode="eval").body)


@st.composite
def arithmetic_expressions(draw, depth=3):
    if depth == 0 or draw(st.booleans()):
        return str(draw(st.integers(0, 999)))
    left, right = draw(arithmetic_expressions(depth - 1)), draw(arithmetic_expressions(depth - 1))
    operator = draw(st.sampled_from("+-*/"))
    space = draw(st.sampled_from(["", " ", "  "]))
    if draw(st.booleans()):
        left = f"({left})"
    if draw(st.booleans()):
        right = f"({right})"
    return f"{left}{space}{operator}{space}{right}"


class TestCountdownParser:
    @settings(max_examples=100, deadline=None)
    @given(arithmetic_expressions())
    def test_matches_reference_evaluation(self, expression):
        parsed = parse_arithmetic(expression)
        assert parsed is not None
        assert parsed.value == reference_value(expression)
        assert list(parsed.numbers) == [
            int(token)
            for token in expression.replace("(", " ")
            .replace(")", " ")
            .replace("+", " ")
            .replace("-", " ")
            .replace("*", " ")
            .replace("/", " ")
            .split()
        ]

    @pytest.mark.parametrize(
        ("expression", "value"),
        [
            ("2+3*4", 14),
            ("8-3-2", 3),
            ("8/4/2", 1),
            ("(7/3)*9", 21),
            ("  ( 1 + 2 ) * 3 ", 9),
            ("10/4", Fraction(5, 2)),
        ],
    )
    def test_precedence_associativity_and_exact_division(self, expression, value):
        assert parse_arithmetic(expression).value == value

    def test_division_by_zero_is_well_formed_but_undefined(self):
        parsed = parse_arithmetic("5/(3-3)+1")
        assert parsed is not None and parsed.value is None and parsed.numbers == (5, 3, 3, 1)

    @pytest.mark.parametrize(
        "expression",
        [
            "",
            "2+",
            "(2+3",
            "2+3)",
            "2 3",
            "-3+5",
            "2**3",
            "2^3",
            "1.5+2",
            "__import__('os').system('echo hi')",
            "1" * (MAX_LITERAL_DIGITS + 1),
            "(" * (MAX_PAREN_DEPTH + 1) + "1" + ")" * (MAX_PAREN_DEPTH + 1),
            "+".join(["1"] * MAX_EXPRESSION_CHARS),
        ],
    )
    def test_malformed_or_out_of_bounds(self, expression):
        assert parse_arithmetic(expression) is None

    def test_depth_limit_is_inclusive(self):
        expression = "(" * MAX_PAREN_DEPTH + "1" + ")" * MAX_PAREN_DEPTH
        assert parse_arithmetic(expression).value == 1


class TestCountdownReward:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("<answer>(1+2)*3 = 9</answer>", "(1+2)*3"),
            ("<answer>9 = 3 * (1 + 2)</answer>", "3 * (1 + 2)"),
            ("<answer>\n$3 \\times (1 + 2)$\n</answer>", "3 * (1 + 2)"),
            ("<answer>12 ÷ 4 × 3</answer>", "12 / 4 * 3"),
            ("Let me think.\nThe equation is 44 + 19 + 35.", "44 + 19 + 35"),
            ("<reasoning>try 1+2</reasoning>\nSo 7 - 3 = 4, answer: (7-3)*5 = 20", "(7-3)*5"),
            ("<answer>9 = 9</answer>", "9"),
            ("no numbers at all", None),
            ("", None),
        ],
    )
    def test_expression_extraction_rules(self, text, expected):
        assert extract_countdown_expression(text) == expected

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("We need 55.\n\\[ \\boxed{34+53-32} \\]", "34+53-32"),  # one line, no <answer> block
            ("So:\n\\[\n\\boxed{34 + 53 - 32}\n\\]\n", "34 + 53 - 32"),  # the box is not on the last line
            ("$$\\boxed{(7 - 3) \\times 5} = 20$$\nDone.", "(7 - 3) * 5"),
            ("<answer></answer>\nFinal: \\boxed{1+2}\nok", "1+2"),  # an empty block counts as none
        ],
    )
    def test_boxed_expression_without_answer_block(self, text, expected):
        assert extract_countdown_expression(text) == expected

    def test_boxed_countdown_answer_scores(self):
        text = "34 + 53 = 87, 87 - 32 = 55.\n\\[\n\\boxed{34+53-32}\n\\]"
        assert countdown_accuracy_reward(None, [text], target=[55], nums=[[34, 53, 32]]) == [1.0]

    def test_real_looking_completion(self):
        completion = """<reasoning>
We need 98 from 44, 19 and 35.
44 + 35 = 79, and 79 + 19 = 98.
</reasoning>
<answer>
44 + 35 + 19 = 98
</answer>"""
        assert countdown_reward(None, [completion], target=[98], nums=[[44, 19, 35]], **TRL_EXTRAS) == [1.0]

    @pytest.mark.parametrize(
        ("answer", "expected"),
        [
            ("(7/3)*9", 1.0),  # exact rational arithmetic
            ("7*3", 0.1),  # misses a number
            ("7*3*9/9", 0.1),  # uses 9 twice
            ("7+3+9", 0.1),  # right numbers, wrong value
            ("7*3*(9-9)/0", 0.1),  # division by zero: well formed, never correct
            ("seven times three", 0.0),  # no expression
            ("(7/3", 0.0),  # malformed
        ],
    )
    def test_scoring_branches(self, answer, expected):
        assert judge_countdown(f"<answer>{answer}</answer>", 21, [7, 3, 9]) == expected

    def test_configurable_partial_credit_and_accuracy_variant(self):
        generous = make_countdown_reward(partial_credit=0.25, name="generous")
        completions = ["<answer>7*3*9</answer>", "<answer>(7/3)*9</answer>"]
        assert generous(None, completions, target=[21, 21], nums=[[7, 3, 9]] * 2) == [0.25, 1.0]
        assert countdown_accuracy_reward(None, completions, target=[21, 21], nums=[[7, 3, 9]] * 2) == [0.0, 1.0]
        assert generous.__name__ == "generous"

    def test_invalid_partial_credit(self):
        with pytest.raises(ValueError, match="partial_credit"):
            make_countdown_reward(partial_credit=1.5)

    def test_rows_without_columns_get_none(self):
        assert countdown_reward(None, ["<answer>1+2</answer>"], target=[3]) == [None]
        assert countdown_reward(None, ["<answer>1+2</answer>"] * 2, target=[3, None], nums=[[1, 2], [1, 2]]) == [
            1.0,
            None,
        ]


# ---------------------------------------------------------------------------------------------------- sudoku
class TestSudoku:
    def test_parse_grid_forms(self):
        expected = tuple(int(char) for char in SUDOKU_PUZZLE)
        assert parse_grid(SUDOKU_PUZZLE) == expected
        assert parse_grid(SUDOKU_PUZZLE.replace("0", ".")) == expected
        assert parse_grid(grid_text(SUDOKU_PUZZLE)) == expected
        assert parse_grid([list(expected[row : row + 4]) for row in range(0, 16, 4)]) == expected
        assert parse_grid(list(expected)) == expected

    @pytest.mark.parametrize("value", ["123", "1" * 17, "5" * 16, None, 7, [[1, 2], "x"], [1] * 15])
    def test_parse_grid_rejects(self, value):
        assert parse_grid(value) is None

    @pytest.mark.parametrize(
        "text",
        [
            f"<answer>\n{grid_text(SUDOKU_SOLUTION)}\n</answer>",
            "<answer>\n"
            + "\n".join(f"Row {i + 1}: {' '.join(grid_text(SUDOKU_SOLUTION).split()[i])}" for i in range(4))
            + "\n</answer>",
            f"<reasoning>Row 1 has 1 and 4, so...</reasoning>\nFinal grid:\n{grid_text(SUDOKU_SOLUTION)}",
            f"<answer>{' | '.join(SUDOKU_SOLUTION)}</answer>",
        ],
    )
    def test_grid_extraction(self, text):
        assert extract_sudoku_grid(text) == parse_grid(SUDOKU_SOLUTION)

    def test_too_few_digits(self):
        assert extract_sudoku_grid("<answer>1423\n3241</answer>") is None
        assert extract_sudoku_grid(f"<answer>{SUDOKU_SOLUTION[:15]}</answer>") is None

    @pytest.mark.parametrize(
        "answer",
        [
            "132132132132132132",  # 18 digits: before, its last 16 were scored (0.375 on the issue's puzzle)
            SUDOKU_SOLUTION + "4",  # 17 digits on one line
            grid_text(SUDOKU_SOLUTION).replace("3241", "32411"),  # 4 lines, one of them with 5 digits
        ],
    )
    def test_more_than_16_digits_is_no_grid_unless_the_last_4_lines_hold_it(self, answer):
        assert extract_sudoku_grid(f"<answer>\n{answer}\n</answer>") is None
        assert sudoku_reward(None, [f"<answer>{answer}</answer>"], puzzle=[SUDOKU_PUZZLE]) == [0.0]

    def test_grid_after_text_inside_the_answer_block(self):
        text = f"<answer>\nFilling 3 blanks of row 2 gives:\n{grid_text(SUDOKU_SOLUTION)}\n</answer>"
        assert extract_sudoku_grid(text) == parse_grid(SUDOKU_SOLUTION)

    def test_issue_example_scored_zero(self):
        # the issue's 18-digit answer scored 0.375 from its last 16 digits
        assert sudoku_reward(None, ["<answer>132132132132132132</answer>"], puzzle=[SUDOKU_PUZZLE]) == [0.0]

    def test_cell_fraction_reward(self):
        blanks = [i for i, cell in enumerate(SUDOKU_PUZZLE) if cell == "0"]
        half_wrong = list(SUDOKU_SOLUTION)
        for index in blanks[: len(blanks) // 2]:
            half_wrong[index] = "9" if half_wrong[index] != "9" else "1"
        changed_given = list(SUDOKU_SOLUTION)
        changed_given[0] = "4"  # cell 0 is a given: the cell reward only looks at blanks
        completions = [
            f"<answer>{grid_text(SUDOKU_SOLUTION)}</answer>",
            f"<answer>{grid_text(''.join(half_wrong))}</answer>",
            f"<answer>{grid_text(''.join(changed_given))}</answer>",
            "<answer>no grid</answer>",
        ]
        rewards = sudoku_reward(None, completions, puzzle=[SUDOKU_PUZZLE] * 4, solution=[SUDOKU_SOLUTION] * 4)
        expected_half = (len(blanks) - len(blanks) // 2) / len(blanks)
        assert rewards == [1.0, pytest.approx(expected_half), 1.0, 0.0]

    def test_cell_reward_solves_when_solution_column_absent(self):
        completion = f"<answer>{grid_text(SUDOKU_SOLUTION)}</answer>"
        assert sudoku_reward(None, [completion], puzzle=[SUDOKU_PUZZLE], **TRL_EXTRAS) == [1.0]
        assert sudoku_reward(None, [completion], puzzle=[SUDOKU_PUZZLE], solution=[None]) == [1.0]

    def test_strict_reward(self):
        incomplete = SUDOKU_SOLUTION[:-1] + "0"
        invalid = "1423324121344321"  # last row repeats the column of row 1
        completions = [
            f"<answer>{grid_text(SUDOKU_SOLUTION)}</answer>",
            f"<answer>{grid_text(OTHER_VALID_GRID)}</answer>",  # valid grid, but breaks the givens
            f"<answer>{grid_text(incomplete)}</answer>",
            f"<answer>{grid_text(invalid)}</answer>",
            "",
        ]
        rewards = sudoku_strict_reward(None, completions, puzzle=[SUDOKU_PUZZLE] * 5)
        assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0]

    def test_rows_without_puzzle_get_none_and_bad_puzzle_scores_zero(self):
        assert sudoku_reward(None, ["x"], solution=[SUDOKU_SOLUTION]) == [None]
        before = REWARD_FALLBACKS["sudoku_strict_reward"]
        assert sudoku_strict_reward(None, ["x"], puzzle=["not a puzzle"]) == [0.0]
        assert REWARD_FALLBACKS["sudoku_strict_reward"] == before + 1


# ---------------------------------------------------------------------------------------------------- format
class TestFormatRewards:
    WELL_FORMED = "<reasoning>\nline one\nline two\n</reasoning>\n<answer>\n42\n</answer>\n"

    @pytest.mark.parametrize(
        ("text", "strict", "soft"),
        [
            (WELL_FORMED, True, True),
            ("  <reasoning>a</reasoning><answer>b</answer>  ", True, True),
            ("Sure! " + WELL_FORMED, False, True),
            (WELL_FORMED + "extra words", False, True),
            ("<reasoning>a</reasoning> so <answer>b</answer>", False, True),
            ("<reasoning>a <answer>x</answer></reasoning><answer>b</answer>", False, True),
            ("<reasoning>a</reasoning>\n<reasoning>b</reasoning><answer>c</answer>", False, True),
            ("<answer>b</answer><reasoning>a</reasoning>", False, False),
            ("<reasoning>a</reasoning>", False, False),
            ("<reasoning>a</reasoning><answer>b", False, False),
            ("", False, False),
        ],
    )
    def test_strict_and_soft(self, text, strict, soft):
        assert is_strict_format(text) is strict
        assert is_soft_format(text) is soft
        assert strict_format_reward(None, [text], **TRL_EXTRAS) == [float(strict)]
        assert soft_format_reward(None, [[{"role": "assistant", "content": text}]]) == [float(soft)]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (WELL_FORMED.rstrip("\n"), 1.0),
            (WELL_FORMED.rstrip("\n") + "0123456789", 0.99),
            (WELL_FORMED + "x" * 1000, 0.75),  # the trailing-text penalty is capped
            ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>c</answer>", 0.5),
            ("<answer>only</answer>", 0.5),
            ("nothing", 0.0),
        ],
    )
    def test_xml_count(self, text, expected):
        assert xml_count_reward(None, [text]) == [pytest.approx(expected)]


# ---------------------------------------------------------------------------------------------------- robustness
# answers that make sympy run for ever: each costs one verifier timeout, so they are not re-drawn by hypothesis
HANGING_MATH = ["<answer>9**9**9</answer>", r"<answer>\boxed{9^{9^{9^{9}}}}</answer>"]
ADVERSARIAL = [
    "",
    " ",
    "9**9**9",
    "<answer>" + "9" * 5000 + "</answer>",
    "1" * 10000,
    "(" * 5000 + "1" + ")" * 5000,
    r"\boxed{" * 3000,
    "<answer>__import__('os').system('rm -rf /')</answer>",
    "<answer>" * 2000,
    "</answer><answer>" * 1000,
    "<reasoning></reasoning>" * 500,
    "\x00\x08\u202e\ud7ff😀 ＜answer＞１２３＜/answer＞",
    "<answer>" + "1/" * 2000 + "1</answer>",
    "<answer>1e999999</answer>",
    "<answer>\\frac{1}{0}</answer>",
    "nan inf -inf None",
]
completion_strategy = st.one_of(
    st.text(max_size=300),
    st.sampled_from(ADVERSARIAL),
    st.builds(
        lambda a, b: f"<reasoning>{a}</reasoning><answer>{b}</answer>", st.text(max_size=60), st.text(max_size=60)
    ),
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["assistant", "user"]), "content": st.text(max_size=80)}),
        max_size=3,
    ),
    st.none(),
)


def assert_valid_rewards(rewards, count):
    assert len(rewards) == count
    for value in rewards:
        assert value is None or (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0)


@pytest.mark.parametrize("completion", ADVERSARIAL + HANGING_MATH)
def test_adversarial_inputs_every_reward(completion, math_reward):
    for reward, columns in _rewards_and_columns(math_reward):
        assert_valid_rewards(reward(None, [completion], None, **columns, **TRL_EXTRAS), 1)


def _rewards_and_columns(math_reward):
    return [
        (math_reward, {"answer": ["#### 42"]}),
        (countdown_reward, {"target": [9], "nums": [[1, 2, 3]]}),
        (countdown_accuracy_reward, {"target": [9], "nums": [[1, 2, 3]]}),
        (sudoku_reward, {"puzzle": [SUDOKU_PUZZLE], "solution": [SUDOKU_SOLUTION]}),
        (sudoku_strict_reward, {"puzzle": [SUDOKU_PUZZLE]}),
        (strict_format_reward, {}),
        (soft_format_reward, {}),
        (xml_count_reward, {}),
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(completions=st.lists(completion_strategy, min_size=1, max_size=3))
def test_arbitrary_inputs_every_reward(completions, math_reward):
    count = len(completions)
    for reward, columns in _rewards_and_columns(math_reward):
        batch_columns = {name: values * count for name, values in columns.items()}
        assert_valid_rewards(reward(None, completions, None, **batch_columns), count)
