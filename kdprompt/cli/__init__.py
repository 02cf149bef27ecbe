"""The ``kdprompt`` command line: the ``main`` group and the commands of each module under it.

Each command module (training, data, evaluation, deployment, benchmarks, demo) parses and validates
its arguments, calls one library function and prints; shared options live in :mod:`.options`.
Heavy modules (torch, the models) are imported inside the commands, so ``kdprompt --help`` is fast.
"""

from __future__ import annotations

import click

from kdprompt.cli.benchmarks import bench
from kdprompt.cli.clipkd import clipkd
from kdprompt.cli.data import cache, shards
from kdprompt.cli.demo import demo
from kdprompt.cli.deployment import export_command, predict_command, serve_command
from kdprompt.cli.evaluation import eval_command
from kdprompt.cli.options import CONTEXT_SETTINGS
from kdprompt.cli.teacher_outputs import teacher_outputs
from kdprompt.cli.training import distill, pretrain, recipes, teacher
from kdprompt.version import __version__


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="kdprompt")
def main() -> None:
    """kdprompt: distill compact CLIP students from prompt-learned teachers.

    \b
    Pipeline:
      kdprompt pretrain RECIPE   contrastive CLIP pre-training on image-text shards
      kdprompt teacher RECIPE    prompt-learn a teacher (PromptSRC / MaPLe), cache its class features
      kdprompt cache TEACHER     text-feature cache for another class list, no retraining
      kdprompt teacher-outputs R (optional) the teacher's image features of V views, computed once
      kdprompt distill RECIPE    distill a compact student on unlabelled shards
      kdprompt clipkd RECIPE     CLIP-KD: distill a whole student CLIP on image-text shards
      kdprompt eval ...          base / novel / HM accuracy of zero-shot CLIPs, teachers, students, bundles
      kdprompt export RUN OUT    ship a distilled student as a bundle (safetensors, cache, optional ONNX)
      kdprompt predict BUNDLE X  classify images with a bundle (table or JSON lines)
      kdprompt serve BUNDLE      HTTP JSON API for a bundle (pip install 'kdprompt[serve]')
      kdprompt shards SRC OUT    write any data source's split as webdataset shards
      kdprompt demo              the pipeline on the built-in synthetic world, offline
      kdprompt bench ...         throughput figures: distill step, bundle vs teacher, the HTTP server

    Every training command takes a RECIPE (a built-in name from `kdprompt recipes`, or a YAML file)
    followed by key.sub=value overrides, and runs unchanged under `accelerate launch -m kdprompt ...`.
    """


main.add_command(recipes, "recipes")
main.add_command(pretrain, "pretrain")
main.add_command(teacher, "teacher")
main.add_command(distill, "distill")
main.add_command(teacher_outputs, "teacher-outputs")
main.add_command(clipkd, "clipkd")
main.add_command(cache, "cache")
main.add_command(shards, "shards")
main.add_command(eval_command, "eval")
main.add_command(export_command, "export")
main.add_command(predict_command, "predict")
main.add_command(serve_command, "serve")
main.add_command(bench, "bench")
main.add_command(demo, "demo")

__all__ = ["main"]
