"""``kdprompt teacher-outputs``: precompute a distill recipe's teacher outputs (stage 2a)."""

from __future__ import annotations

import click

from kdprompt.cli.options import echo_main, recipe_command


@recipe_command
def teacher_outputs(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Precompute the teacher's image features of V seeded augmented views of every unlabelled image.

    RECIPE is the distill recipe (built-in name or YAML file) and OVERRIDES its key.sub=value pairs; its
    teacher_outputs section says where and how, e.g. `teacher_outputs.path=cache/to/demo
    teacher_outputs.views=4 teacher_outputs.dtype=fp16`. Writes one safetensors part per shard plus
    manifest.json; `kdprompt distill` with the same recipe then reads them instead of running the
    teacher's image tower. Runs under `accelerate launch` (ranks take disjoint shards); a killed run
    resumes where it stopped when started again.
    """
    from kdprompt.config.distill import DistillRecipe
    from kdprompt.config.loading import dump_recipe, load_recipe
    from kdprompt.teacher_outputs.manifest import read_manifest
    from kdprompt.teacher_outputs.precompute import precompute_teacher_outputs

    resolved = load_recipe(DistillRecipe, recipe, overrides)
    if dry_run:
        click.echo(dump_recipe(resolved), nl=False)
        return
    root = precompute_teacher_outputs(resolved)
    manifest = read_manifest(root) or {}
    stats, spec = manifest.get("stats", {}), manifest.get("spec", {})
    echo_main(
        f"done: {root}: {stats.get('images')} images x {spec.get('views')} views, {stats.get('bytes')} bytes "
        f"({stats.get('bytes_per_image_view')} per image per view, {spec.get('dtype')})"
    )
