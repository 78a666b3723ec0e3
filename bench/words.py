"""The small vocabulary that benchmark and test prompts are written in: common English words,
each one or two tokens of the tiny test tokenizer, so a prompt's token count follows its
word count."""

_TEXT = (
    "the model reads every request and the router keeps a cache of prefixes so that long "
    "conversations land where their tokens already live while load spreads evenly across "
    "workers data parallel ranks prefill decode blocks events metrics gateway"
)
WORDS: tuple[str, ...] = tuple(_TEXT.split())
