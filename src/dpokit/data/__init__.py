from .formats import Pair, row_to_pair, split_implicit_prompt
from .load import load_examples, load_pairs
from .readers import read_rows
from .tokenize import Example, tokenize_pair

__all__ = ["Pair", "Example", "row_to_pair", "split_implicit_prompt", "load_pairs", "load_examples",
           "read_rows", "tokenize_pair"]
