"""Synthetic verifiable tasks generated in code (no downloads)."""

from resrl.tasks.arithmetic import (
    build_char_tokenizer,
    format_prompt,
    generate_problems,
    generate_splits,
    write_dataset,
)

__all__ = ["build_char_tokenizer", "format_prompt", "generate_problems", "generate_splits", "write_dataset"]
