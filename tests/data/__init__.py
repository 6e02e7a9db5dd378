"""Package marker: gives tests/data modules unique names (data.test_*), e.g. test_demo.py vs tests/eval/test_demo.py."""
