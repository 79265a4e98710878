from .formats import Pair, RowProblem, row_to_pair, split_implicit_prompt
from .load import load_examples, load_pairs
from .readers import iter_rows, read_rows
from .tokenize import Example, tokenize_pair

__all__ = ["Pair", "Example", "RowProblem", "row_to_pair", "split_implicit_prompt", "load_pairs", "load_examples",
           "read_rows", "iter_rows", "tokenize_pair"]
