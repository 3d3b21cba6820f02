"""Build the bundled default data from the shared source files (deterministic, seeded).

    python data/prepare_default.py                     # reads ../shared/data next to the checkout
    python data/prepare_default.py --src /path/to/shared/data

Writes, next to this script (or to --out):
  default_train.jsonl    a mix of ~3,200 conversations, {"messages": [...], "source": <file stem>}
  default_prompts.jsonl  prompts only, {"prompt": ..., "source": ...}, for self-distillation
  mt_bench_question.jsonl  an unchanged copy (evaluation only: never in the two files above)
Each source goes through medusa_train.data.load_conversations, so rows read exactly as
they would when listed in a config. See SOURCES.md for origins and licenses.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path

from medusa_train.data import load_conversations

HERE = Path(__file__).resolve().parent
SEED = 0

# file -> conversations sampled for training (None: all). Sized for the default CPU run
# (a few hundred steps of batch 8 see ~2,400 rows): a mix of chat, code, role play,
# math, summarisation and short tasks. The FastChat dummy set is mostly identity
# questions answered as "Vicuna", so only a small share.
TRAIN_MIX = {
    "fastchat_dummy_conversation.json": 200,
    "gpteacher_codegen.json": 800,
    "gpteacher_roleplay.json": 600,
    "gsm8k_train.jsonl": 800,  # the train split only; GSM8K test stays out
    "t0_cnn_dailymail_prompts.jsonl": 300,
    "selfinstruct_seed_tasks_175.jsonl": None,
    "selfinstruct_user_oriented_252.jsonl": None,
}
PROMPT_FILES = [
    "oasst_prompt_lottery_en_250.jsonl",
    "selfinstruct_seed_tasks_175.jsonl",
    "selfinstruct_user_oriented_252.jsonl",
]
EVAL_COPIES = ["mt_bench_question.jsonl"]

# The default max_length is 512 tokens: a conversation whose first reply starts later
# than ~1,600 characters (~400 tokens) would be cut to (almost) no labelled tokens, so it
# is left out (this trims mostly the long CNN/DailyMail articles).
MAX_PROMPT_CHARS = 1600

# GSM8K answers annotate arithmetic for a calculator tool (<<48/2=24>>24); chat models
# have no such tool, so the annotations are dropped and the plain result kept.
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _sample(rows: list, n: int | None, rng: random.Random) -> list:
    return rows if n is None or n >= len(rows) else [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]


def _prompt_chars(messages: list[dict]) -> int:
    first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return sum(len(m["content"]) for m in messages[:first_reply])


def build_train(src: Path, rng: random.Random) -> list[dict]:
    out = []
    for name, n in TRAIN_MIX.items():
        ds = load_conversations([str(src / name)])
        stem = Path(name).stem
        fitting = [m for m in ds["messages"] if _prompt_chars(m) <= MAX_PROMPT_CHARS]
        for messages in _sample(fitting, n, rng):
            if stem.startswith("gsm8k"):
                messages = [{**m, "content": _CALCULATOR.sub("", m["content"])} for m in messages]
            out.append({"messages": messages, "source": stem})
    rng.shuffle(out)
    return out


def build_prompts(src: Path) -> list[dict]:
    out, seen = [], set()
    for name in PROMPT_FILES:
        ds = load_conversations([str(src / name)], require_assistant=False)
        for messages in ds["messages"]:
            prompt = next(m["content"] for m in messages if m["role"] == "user")
            if prompt not in seen:
                seen.add(prompt)
                out.append({"prompt": prompt, "source": Path(name).stem})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    write_jsonl(args.out / "default_train.jsonl", build_train(args.src, random.Random(SEED)))
    write_jsonl(args.out / "default_prompts.jsonl", build_prompts(args.src))
    for name in EVAL_COPIES:
        shutil.copyfile(args.src / name, args.out / name)
        print(f"copied {name}")


if __name__ == "__main__":
    main()
