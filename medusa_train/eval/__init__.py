"""Speedup evaluation and hardware-aware tree search: `python -m medusa_train.eval heads=PATH`.

    questions.py   MT-bench / Spec-Bench question files
    methods.py     decoding methods by name (HF generate, runtime, Medusa, HF assisted): the registry
    bench.py       interleaved timing per prompt, per-category aggregation
    accuracy.py    head top-k accuracy and path probabilities
    latency.py     forward latency per tree size on this device
    tree_search.py greedy tree construction and the tokens/s-optimal size
    report.py      results JSON, markdown table, PNG plot
"""

from medusa_train.eval.accuracy import HeadRanks, head_accuracy, measure_ranks
from medusa_train.eval.bench import aggregate, by_category, run_bench
from medusa_train.eval.latency import LatencyProfile, calibrate_overhead, profile_latency
from medusa_train.eval.methods import BASELINE, METHODS, Generation, MethodContext, register_method
from medusa_train.eval.questions import Question, QuestionFileError, load_questions, select_questions
from medusa_train.eval.tree_search import choose_budget, expected_accept_length, greedy_nodes, search_tree

__all__ = [
    "BASELINE",
    "METHODS",
    "Generation",
    "HeadRanks",
    "LatencyProfile",
    "MethodContext",
    "Question",
    "QuestionFileError",
    "aggregate",
    "by_category",
    "calibrate_overhead",
    "choose_budget",
    "expected_accept_length",
    "greedy_nodes",
    "head_accuracy",
    "load_questions",
    "measure_ranks",
    "profile_latency",
    "register_method",
    "run_bench",
    "search_tree",
    "select_questions",
]
