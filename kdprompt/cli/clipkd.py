"""``kdprompt clipkd``: CLIP-KD's caption mode, a whole student CLIP distilled on image-text data."""

from __future__ import annotations

from kdprompt.cli.options import recipe_command
from kdprompt.cli.training import run_recipe


@recipe_command
def clipkd(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Distill a student CLIP (image AND text towers) from a frozen teacher CLIP on image-text shards.

    CLIP-KD (Yang et al., CVPR 2024): the student's own CLIP loss plus `fd`, `icl` and `crd` (CLIP-KD's
    cross-modal losses, its default weights 2000, 1, 1). RECIPE is a built-in name (see `kdprompt
    recipes`) or a YAML file; OVERRIDES are key.sub=value pairs, e.g. `objectives.icl=null
    teacher.pretrained=cache/pretrained/t.safetensors`. Writes <output_dir>/<name>/clipkd/:
    model.safetensors (open_clip-loadable, as `kdprompt pretrain` writes), metrics.jsonl, metrics.json,
    curves.png, checkpoints/.
    """
    run_recipe("clipkd", recipe, overrides, dry_run)
