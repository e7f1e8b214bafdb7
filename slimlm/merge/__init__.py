"""Model merging (`slimlm merge-models`): linear, task arithmetic, TIES, DARE, SLERP and chat vector over HF folders
of one architecture, from recipes in mergekit's YAML layout. See methods.py (arithmetic), recipe.py (YAML),
run.py (files). Folding an adapter into its base is elsewhere (slimlm.peft.merge, `slimlm merge`)."""

from slimlm.merge.merge_config import MergeRecipe, load_merge_recipe
from slimlm.merge.methods import MERGE_METHODS, chat_vector
from slimlm.merge.run import run_merge

__all__ = ["MERGE_METHODS", "MergeRecipe", "chat_vector", "load_merge_recipe", "run_merge"]
