import pytest

from gptoss_train.eval import graders


@pytest.mark.parametrize("prediction, gold, expected", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac12", "\\frac{1}{2}", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(2,1)", "(1,2)", False),          # points are ordered
    ("3, 2", "2, 3", True),             # a list of solutions is not
    ("\\{3,2\\}", "\\{2,3\\}", True),   # nor is a set
    ("x = 5", "5", True),
    ("120^\\circ", "120", True),
    ("120 degrees", "120^\\circ", True),
    ("3\\sqrt2", "3\\sqrt{2}", True),
    ("4.2426", "3\\sqrt{2}", True),     # numeric equality within tolerance
    ("1,000", "1000", True),
    ("\\text{(C)}", "(C)", True),
    ("\\$18.90", "18.90", True),
    ("[0, \\infty)", "[0,\\infty)", True),
    ("[0, \\infty)", "(0,\\infty)", False),
    ("7", "8", False),
    (None, "8", False),
])
def test_math_equal(prediction, gold, expected):
    assert graders.math_equal(prediction, gold) is expected


def test_last_boxed_nested_braces_and_fbox():
    assert graders.last_boxed("first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert graders.last_boxed("\\fbox{42}") == "42"
    assert graders.last_boxed("\\boxed 7$") == "7"
    assert graders.last_boxed("no box") is None
    assert graders.last_boxed("\\boxed{unclosed") is None


def test_math_extract_falls_back_to_answer_line():
    assert graders.math_extract("so the final answer is: $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert graders.math_extract("I have no idea") is None


@pytest.mark.parametrize("final, gold, expected", [
    ("The total is $1,234.", "1234", True),
    ("So she sells 159 rolls.\n", "159", True),
    ("It is 72.0", "72", True),
    ("first 3 then \\boxed{18} and 5 apples later", "18", True),  # boxed wins over the last number
    ("-5 degrees", "-5", True),
    ("answer: 12", "13", False),
    ("no number", "3", False),
])
def test_gsm8k(final, gold, expected):
    assert graders.gsm8k_equal(graders.gsm8k_extract(final), gold) is expected


def test_gsm8k_gold_from_worked_solution():
    assert graders.gsm8k_gold("48/2 = <<48/2=24>>24\n#### 1,024") == "1024"


@pytest.mark.parametrize("final, expected", [
    ("**Answer: 073**", 73),
    ("thus \\boxed{204}.", 204),
    ("\\boxed{1000}", None),   # outside 0..999
    ("\\boxed{2.5}", None),    # not an integer
    ("", None),
])
def test_aime_extract(final, expected):
    assert graders.aime_extract(final) == expected


@pytest.mark.parametrize("final, expected", [
    ("Reasoning...\nAnswer: C", "C"),
    ("**Answer:** (b)", "B"),
    ("Answer: $\\text{D}$", "D"),
    ("The answer is \\boxed{A}", "A"),
    ("B", "B"),
    ("Answer: A ... wait, Answer: D", "D"),  # the last one counts
    ("Answer: E", None),
    ("I think it could be C or D", None),
])
def test_choice_extract(final, expected):
    assert graders.choice_extract(final) == expected
