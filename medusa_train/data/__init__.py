"""The data layer: files or hub datasets -> conversations -> token ids with assistant-only labels -> batches.

    ds = load_conversations(["data/default_train.jsonl"])        # messages, source
    tokens = tokenize_conversations(ds, tokenizer, max_length=512)  # input_ids, labels
    train, eval = train_eval_split(tokens, eval_fraction=0.05, seed=0)
    batch = collate([train[i] for i in range(8)], tokenizer.pad_token_id)
"""

from medusa_train.data.collate import collate
from medusa_train.data.formats import FORMATS, DataError
from medusa_train.data.readers import load_conversations, resolve_data_path
from medusa_train.data.splits import train_eval_split
from medusa_train.data.tokenize import PLAIN_CHAT_TEMPLATE, chat_template, tokenize_conversations

__all__ = [
    "FORMATS",
    "PLAIN_CHAT_TEMPLATE",
    "DataError",
    "chat_template",
    "collate",
    "load_conversations",
    "resolve_data_path",
    "tokenize_conversations",
    "train_eval_split",
]
