"""Prompt sets: their type and how an epoch draws from them (``sets``), where they come from (``loading``),
their Parquet files (``parquet``), the metadata vocabulary (``vocabulary``) and the project's generators
(``generators``). Below ``evaluation/`` and ``pretrain/``, which both use them.
"""

from flowgrpo_core.prompts.loading import GENERATED_SETS, builtin_names, load_builtin, load_prompts
from flowgrpo_core.prompts.sets import PromptSet, draw_prompts, tag_groups

__all__ = [
    "GENERATED_SETS",
    "PromptSet",
    "builtin_names",
    "draw_prompts",
    "load_builtin",
    "load_prompts",
    "tag_groups",
]
